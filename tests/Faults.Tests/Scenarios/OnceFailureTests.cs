using OrleansIdempotency.Faults.Tests.Harness;
using Xunit.Abstractions;

namespace OrleansIdempotency.Faults.Tests.Scenarios;

/// <summary>
/// DESIGN §6 for the Once API over HTTP: workers in another process, a silo and an API node killed under them, one
/// answer in 25 lost on its way back to a worker.
/// </summary>
[Trait("Category", "Long")]
public sealed class OnceFailureTests(ITestOutputHelper output)
{
    private const int Keys = 600;

    [Fact]
    public async Task SiloAndApiKilledWhileWorkersClaimAndComplete_EachOperationRunsOnce_AndEveryKeyKeepsItsResultAcrossAClusterRestart()
    {
        await using var cluster = await FaultCluster.StartAsync(silos: 3, apis: 2);
        using var workers = new OnceWorkers(cluster.Apis.Select(a => a.BaseAddress!).ToList(), loseEvery: 25);

        var run = workers.RunAsync("once-kill-", Keys, workersPerKey: 4, keysInFlight: 16, operation: TimeSpan.FromMilliseconds(50), deadline: TimeSpan.FromMinutes(3));
        await Task.Delay(TimeSpan.FromSeconds(2));
        await cluster.Silos[1].KillAsync();
        await Task.Delay(TimeSpan.FromSeconds(1));
        await cluster.Apis[1].KillAsync();
        await Task.Delay(TimeSpan.FromSeconds(3));
        Assert.False(run.IsCompleted, "The workers finished before the nodes came back; the scenario proves nothing.");
        cluster.Silos[1].Start();
        cluster.Apis[1].Start();
        await run;

        var runs = Enumerable.Range(0, Keys).Select(i => workers.Runs.GetValueOrDefault(OnceWorkers.Key("once-kill-", i))).ToArray();
        var disagreeing = Enumerable.Range(0, Keys).Count(i =>
            workers.Results.TryGetValue(OnceWorkers.Key("once-kill-", i), out var results) && results.Distinct().Count() > 1);
        FaultReport.Write(output,
            $"once api, silo and api kill -9: requests={workers.Requests} keys={Keys} runs={runs.Sum()} run-twice={runs.Count(r => r > 1)} " +
            $"never-run={runs.Count(r => r == 0)} disagreeing={disagreeing} gave-up={workers.GaveUp.Count} 503={workers.Unavailable} " +
            $"connection-errors={workers.ConnectionErrors} answers-lost={workers.AnswersLost} surprises={workers.Surprises.Count} {string.Join("; ", workers.Surprises.Take(5))}");
        Assert.All(runs, r => Assert.Equal(1, r));
        Assert.Equal(0, disagreeing);
        Assert.Empty(workers.GaveUp);
        Assert.Empty(workers.Surprises);
        Assert.All(Enumerable.Range(0, Keys), i => Assert.Equal(4, workers.Results[OnceWorkers.Key("once-kill-", i)].Count));

        // Every silo killed at once and started again: each key still answers the result its workers saw.
        foreach (var silo in cluster.Silos)
        {
            await silo.KillAsync();
        }

        cluster.Silos.ForEach(s => s.Start());
        await cluster.WaitUntilServingAsync(3, TimeSpan.FromSeconds(90));
        var changed = 0;
        for (var i = 0; i < Keys; i += 3)
        {
            var key = OnceWorkers.Key("once-kill-", i);
            var (status, result) = await workers.ReadAsync(key, i);
            changed += status == "completed" && result == workers.Results[key].First() ? 0 : 1;
        }

        FaultReport.Write(output, $"once api, whole cluster restarted: keys read={Keys / 3} changed={changed}");
        Assert.Equal(0, changed);
    }
}
