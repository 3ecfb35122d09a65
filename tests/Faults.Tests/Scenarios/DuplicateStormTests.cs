using OrleansIdempotency.Testing;
using OrleansIdempotency.Faults.Tests.Harness;
using Xunit.Abstractions;

namespace OrleansIdempotency.Faults.Tests.Scenarios;

[Trait("Category", "Long")]
public sealed class DuplicateStormTests(ITestOutputHelper output)
{
    [Fact]
    public async Task ThousandKeysTimesTenConcurrentDuplicates_ThroughTwoApisAndThreeSilos_RunEachOnce()
    {
        await using var cluster = await FaultCluster.StartAsync(silos: 3, apis: 2);
        var workload = new Workload(cluster.Apis.Select(a => a.BaseAddress!).ToList());
        var options = new WorkloadOptions("storm-", Keys: 1000, DuplicatesPerKey: 10, Deadline: TimeSpan.FromMinutes(4));

        await workload.RunAsync(options);
        var verdict = await Checker.CheckAsync("duplicate storm", cluster, workload, options);
        FaultReport.Write(output, verdict);

        Assert.Equal(1000, verdict.SideEffects);
        Assert.Equal(0, verdict.Duplicates);
        Assert.Equal(0, verdict.Disagreements);
        Assert.Equal(0, verdict.Lost);
        Assert.Equal(0, verdict.NotReplayed);
        Assert.Equal(0, verdict.GaveUp);
        Assert.Equal(0, verdict.OutcomeUnknown);
        Assert.Equal(0, verdict.ServerErrors);
        // Wait mode: every duplicate, in flight or late, got the original response.
        Assert.All(workload.Replies.Values.SelectMany(r => r), reply => Assert.Equal(201, reply.Status));
        // Every copy got an answer, and so did the checker's own replay of each key.
        Assert.Equal(options.Keys * (options.DuplicatesPerKey + options.LateDuplicatesPerKey + 1), workload.Replies.Values.Sum(r => r.Count));
    }
}
