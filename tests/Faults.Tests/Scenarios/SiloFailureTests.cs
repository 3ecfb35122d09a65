using OrleansIdempotency.Testing;
using OrleansIdempotency.Faults.Tests.Harness;
using Xunit.Abstractions;

namespace OrleansIdempotency.Faults.Tests.Scenarios;

[Trait("Category", "Long")]
public sealed class SiloFailureTests(ITestOutputHelper output)
{
    [Fact]
    public async Task SiloKilledMidFlight_ThenRestarted_NoKeyRunsTwice_CompletedKeysReplay_AndServiceResumes()
    {
        await using var cluster = await FaultCluster.StartAsync(silos: 3, apis: 2);
        var workload = new Workload(cluster.Apis.Select(a => a.BaseAddress!).ToList());
        var options = new WorkloadOptions("silo-kill-", Keys: 3000, DuplicatesPerKey: 4, Deadline: TimeSpan.FromMinutes(3))
        {
            KeysInFlight = 16,
            ActionDelayMs = 50,
        };

        var run = workload.RunAsync(options);
        await Task.Delay(TimeSpan.FromSeconds(2));
        await cluster.Silos[1].KillAsync();
        await Task.Delay(TimeSpan.FromSeconds(3));
        Assert.False(run.IsCompleted, "The load ended before the silo came back; the scenario proves nothing.");
        cluster.Silos[1].Start();
        await run;
        await cluster.WaitUntilServingAsync(3, TimeSpan.FromSeconds(60));

        var verdict = await Checker.CheckAsync("silo kill -9 + restart", cluster, workload, options);
        FaultReport.Write(output, verdict);
        Assert.Equal(options.Keys, verdict.SideEffects);
        Assert.Equal(0, verdict.Duplicates);
        Assert.Equal(0, verdict.Disagreements);
        Assert.Equal(0, verdict.Lost);
        Assert.Equal(0, verdict.NotReplayed);
        Assert.Equal(0, verdict.GaveUp);
        Assert.Equal(0, verdict.OutcomeUnknown);

        // A call lost with the silo is asked again, within the cluster retry budget: the clients never saw it fail.
        Assert.Equal(0, verdict.ServerErrors);

        // New work after the failure, with no operator in between.
        var after = new WorkloadOptions("silo-kill-after-", Keys: 50, DuplicatesPerKey: 2, Deadline: TimeSpan.FromMinutes(1));
        var fresh = new Workload(cluster.Apis.Select(a => a.BaseAddress!).ToList());
        await fresh.RunAsync(after);
        var resumed = await Checker.CheckAsync("silo kill: service afterwards", cluster, fresh, after);
        FaultReport.Write(output, resumed);
        Assert.Equal(50, resumed.SideEffects);
        Assert.Equal(0, resumed.ServerErrors);
    }
}
