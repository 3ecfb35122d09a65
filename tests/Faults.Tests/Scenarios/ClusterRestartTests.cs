using OrleansIdempotency.Testing;
using OrleansIdempotency.Faults.Tests.Harness;
using Xunit.Abstractions;

namespace OrleansIdempotency.Faults.Tests.Scenarios;

[Trait("Category", "Long")]
public sealed class ClusterRestartTests(ITestOutputHelper output)
{
    [Fact]
    public async Task WholeClusterStoppedAndStarted_EveryCompletedKeyReplaysTheOriginalBytes()
    {
        await using var cluster = await FaultCluster.StartAsync(silos: 2, apis: 2);
        var workload = new Workload(cluster.Apis.Select(a => a.BaseAddress!).ToList());
        var options = new WorkloadOptions("restart-", Keys: 300, DuplicatesPerKey: 2, Deadline: TimeSpan.FromMinutes(2));
        await workload.RunAsync(options);

        foreach (var node in cluster.Apis.Concat(cluster.Silos))
        {
            await node.StopAsync();
        }

        cluster.Silos.ForEach(s => s.Start());
        cluster.Apis.ForEach(a => a.Start());
        await cluster.WaitUntilServingAsync(cluster.Silos.Count, TimeSpan.FromSeconds(90));

        // The checker sends every completed key again, now to the restarted cluster.
        var verdict = await Checker.CheckAsync("whole cluster restart", cluster, workload, options);
        FaultReport.Write(output, verdict);
        Assert.Equal(300, verdict.SideEffects);
        Assert.Equal(0, verdict.NotReplayed);
        Assert.Equal(0, verdict.Duplicates);
        Assert.Equal(0, verdict.Disagreements);
        Assert.Equal(0, verdict.OutcomeUnknown);
        Assert.Equal(0, verdict.ServerErrors);
    }
}
