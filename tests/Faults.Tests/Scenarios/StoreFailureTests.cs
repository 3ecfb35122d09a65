using System.Net;
using OrleansIdempotency.Testing;
using Npgsql;
using OrleansIdempotency.Faults.Tests.Harness;
using Xunit.Abstractions;

namespace OrleansIdempotency.Faults.Tests.Scenarios;

[Trait("Category", "Long")]
public sealed class StoreFailureTests(ITestOutputHelper output)
{
    [Fact]
    public async Task PostgresStoppedForTenSecondsUnderLoad_Answers503_RunsNothingUnclaimed_NoDuplicates_AndResumes()
    {
        await using var cluster = await FaultCluster.StartAsync(silos: 2, apis: 2);
        var (workload, verdict) = await RunThroughOutageAsync(cluster, "postgres down 10 s", OutageWorkload("pg-down-"), cluster.Postgres.StopAsync, cluster.Postgres.StartAgainAsync);

        await AssertFailedClosedAsync(cluster, workload, verdict, "pg-down-");
        Assert.Equal(0, verdict.OutcomeUnknown);
    }

    [Fact]
    public async Task PostgresFrozenUnderLoad_AnswersWithinTheRetryBudget_503WhenItOutlastsIt_NoDuplicates_AndResumes()
    {
        // Frozen, not stopped: connections stay open and nothing answers, so every grain call gives up after its 5 s
        // and a write sent just before may land once it thaws (its caller told 503). What the stop test cannot show.
        // Frozen for 35 s: well past the API's 15 s retry budget (and a last call after it), which must then answer
        // 503, not wait for the thaw; under a lease of a minute, so that the completions of the actions that ran as it
        // froze land after it (a store gone for longer than a lease leaves them in doubt, as the README says).
        var outage = TimeSpan.FromSeconds(35);
        await using var cluster = await FaultCluster.StartAsync(silos: 2, apis: 2, apiSettings: new Dictionary<string, string> { ["Idempotency__Lease"] = "00:01:00" });
        TimeSpan? probeTook = null;
        HttpStatusCode? probeStatus = null;
        async Task ProbeAsync()
        {
            await Task.Delay(TimeSpan.FromSeconds(1));
            using var client = Orders.Client(cluster.Apis[0]);
            var started = DateTime.UtcNow;
            probeStatus = (await Orders.SendAsync(client, "probe-of-pg-frozen")).Status;
            probeTook = DateTime.UtcNow - started;
        }

        var options = OutageWorkload("pg-frozen-");
        var (workload, verdict) = await RunThroughOutageAsync(cluster, "postgres frozen 35 s", options,
            () => Task.Run(cluster.Postgres.Freeze), () => Task.Run(cluster.Postgres.Thaw), ProbeAsync, outage);
        output.WriteLine($"a new key sent 1 s into the freeze: {probeStatus} after {probeTook?.TotalSeconds:F1} s");

        // Answered while still frozen (an answer after the thaw would have run the order: 201).
        Assert.Equal(HttpStatusCode.ServiceUnavailable, probeStatus);
        Assert.True(probeTook < outage - TimeSpan.FromSeconds(3), $"The new key was answered after {probeTook}, at the thaw.");
        // Only keys whose own insert was out as it froze may be in doubt (timed out unanswered): their honest outcome.
        Assert.InRange(verdict.OutcomeUnknown, 0, options.KeysInFlight);
        await AssertFailedClosedAsync(cluster, workload, verdict, "pg-frozen-");
    }

    [Fact]
    public async Task RedisStoppedAndStartedUnderLoad_RunningSilosKeepServing_NoDuplicates()
    {
        await using var cluster = await FaultCluster.StartAsync(silos: 3, apis: 2);
        var (_, verdict) = await RunThroughOutageAsync(cluster, "redis down 10 s", OutageWorkload("redis-down-"), cluster.Redis.StopAsync, cluster.Redis.StartAgainAsync);

        Assert.Equal(0, verdict.Duplicates);
        Assert.Equal(0, verdict.Disagreements);
        Assert.Equal(0, verdict.Lost);
        Assert.Equal(0, verdict.NotReplayed);
        Assert.Equal(0, verdict.GaveUp);
        Assert.Equal(0, verdict.OutcomeUnknown);
        Assert.Equal(0, verdict.ServerErrors);
        Assert.All(cluster.Silos.Concat(cluster.Apis), node => Assert.True(node.IsRunning, $"{node.Name} stopped"));
    }

    // The actions' sleeps alone (3,000 keys, 8 at a time, 50 ms each) keep the load going for about 19 s, well past a
    // 10 s outage's start, however fast the servers are.
    private static WorkloadOptions OutageWorkload(string prefix) =>
        new(prefix, Keys: 3000, DuplicatesPerKey: 3, Deadline: TimeSpan.FromMinutes(3)) { KeysInFlight = 8, ActionDelayMs = 50 };

    /// <summary>Runs the workload, takes a server down (for 10 s unless told) two seconds in, brings it back, and checks the keys.</summary>
    private async Task<(Workload Workload, Verdict Verdict)> RunThroughOutageAsync(
        FaultCluster cluster, string scenario, WorkloadOptions options, Func<Task> stop, Func<Task> start, Func<Task>? duringOutage = null, TimeSpan? outage = null)
    {
        var workload = new Workload(cluster.Apis.Select(a => a.BaseAddress!).ToList());
        var run = workload.RunAsync(options);
        await Task.Delay(TimeSpan.FromSeconds(2));
        await stop();
        var during = duringOutage?.Invoke() ?? Task.CompletedTask;
        bool endedDuringTheOutage;
        try
        {
            await Task.Delay(outage ?? TimeSpan.FromSeconds(10));
            endedDuringTheOutage = run.IsCompleted;
        }
        finally
        {
            await start();
        }

        Assert.False(endedDuringTheOutage, "The load ended during the outage; the scenario proves nothing.");
        await during;
        await run;

        var verdict = await Checker.CheckAsync(scenario, cluster, workload, options);
        FaultReport.Write(output, verdict);
        // Every key ran, once: none was left refused (a 4xx counts as an answer, not a side effect). A key left in doubt
        // may have run or not (its action's own write timed out unanswered): at most once.
        Assert.InRange(verdict.SideEffects, options.Keys - verdict.OutcomeUnknown, options.Keys);
        return (workload, verdict);
    }

    // The outage answered with 503 (with Retry-After but for keys left in doubt), never another 5xx (whether the layer's claim or the action's own
    // insert met it); no key ran twice, every reply agrees and replays, no action ran without a claim, no node died.
    private static async Task AssertFailedClosedAsync(FaultCluster cluster, Workload workload, Verdict verdict, string prefix)
    {
        Assert.True(verdict.Unavailable > 0, "The outage should have been answered with 503s.");
        Assert.Equal(verdict.ServerErrors, verdict.Unavailable);
        // Only a key left in doubt (its action's own write unanswered) is answered without an invitation to retry.
        Assert.InRange(workload.Stats.UnavailableWithoutRetryAfter, 0, verdict.OutcomeUnknown);
        Assert.Equal(0, verdict.Duplicates);
        Assert.Equal(0, verdict.Disagreements);
        Assert.Equal(0, verdict.Lost);
        Assert.Equal(0, verdict.NotReplayed);
        Assert.Equal(0, verdict.GaveUp);
        Assert.Equal(0, await SideEffectsWithoutAClaimAsync(cluster, prefix));
        Assert.All(cluster.Silos.Concat(cluster.Apis), node => Assert.True(node.IsRunning, $"{node.Name} stopped"));
    }

    /// <summary>Side effects whose key has no record in the idempotency store: an action that ran without a claim.</summary>
    private static async Task<long> SideEffectsWithoutAClaimAsync(FaultCluster cluster, string prefix)
    {
        await using var connection = new NpgsqlConnection(cluster.Database + ";Pooling=false");
        await connection.OpenAsync();
        await using var command = new NpgsqlCommand("""
            SELECT count(*) FROM demo_orders o
            WHERE o.request_key LIKE @prefix
              AND NOT EXISTS (SELECT 1 FROM OrleansStorage s WHERE s.GrainIdExtensionString = '10:user:alice:' || o.request_key)
            """, connection);
        command.Parameters.AddWithValue("prefix", prefix + "%");
        return (long)(await command.ExecuteScalarAsync())!;
    }
}
