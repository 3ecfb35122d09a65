using OrleansIdempotency.Testing;
using System.Text;
using OrleansIdempotency.Faults.Tests.Harness;
using Xunit.Abstractions;

namespace OrleansIdempotency.Faults.Tests.Scenarios;

[Trait("Category", "Long")]
public sealed class ApiFailureTests(ITestOutputHelper output)
{
    private const int Keys = 10;

    private static readonly Dictionary<string, string> ShortLease = new() { ["Idempotency__Lease"] = "00:00:03" };

    [Fact]
    public async Task ApiKilledMidAction_KeysBecomeOutcomeUnknown_AndWithTheOptInRerunExactlyOnce()
    {
        await using var cluster = await FaultCluster.StartAsync(silos: 2, apis: 1, apiSettings: ShortLease);
        var reclaiming = await cluster.AddApiAsync("api-reclaim", new Dictionary<string, string>(ShortLease) { ["Idempotency__OnLapsedLease"] = "Reclaim" });

        // Default: the key's outcome is in doubt, so it is never run again.
        var unknown = await KillMidActionAsync(cluster, cluster.Apis[0], "api-kill-");
        FaultReport.Write(output, unknown);
        Assert.Equal(Keys, unknown.OutcomeUnknown);
        Assert.Equal(0, unknown.SideEffects);

        // Opt-in (at-least-once): the lapsed key is claimed again and run once, whatever the number of retries.
        var rerun = await KillMidActionAsync(cluster, reclaiming, "api-kill-rerun-");
        FaultReport.Write(output, rerun);
        Assert.Equal(Keys, rerun.SideEffects);
        Assert.Equal(0, rerun.Duplicates);
        Assert.Equal(0, rerun.Disagreements);
        Assert.Equal(0, rerun.OutcomeUnknown);
    }

    private static async Task<Verdict> KillMidActionAsync(FaultCluster cluster, NodeProcess api, string prefix)
    {
        var options = new WorkloadOptions(prefix, Keys, DuplicatesPerKey: 5, Deadline: TimeSpan.FromSeconds(60)) { LateDuplicatesPerKey = 0 };
        using (var client = new HttpClient { BaseAddress = api.BaseAddress, DefaultRequestHeaders = { { "Authorization", "Bearer demo-alice" } } })
        {
            // Each action sleeps 5 s before its side effect; the process dies in the middle of it.
            var inFlight = Enumerable.Range(0, Keys).Select(i =>
            {
                var request = new HttpRequestMessage(HttpMethod.Post, options.Path)
                {
                    Content = new StringContent(Workload.Body(options.Path, Workload.Key(options, i)), Encoding.UTF8, "application/json"),
                };
                request.Headers.Add("Idempotency-Key", Workload.Key(options, i));
                request.Headers.Add("X-Demo-Delay-Ms", "5000");
                return client.SendAsync(request);
            }).ToArray();
            await cluster.WaitUntilClaimedAsync(Enumerable.Range(0, Keys).Select(i => Workload.Key(options, i)).ToArray(), TimeSpan.FromSeconds(30));
            await api.KillAsync();
            await Assert.ThrowsAnyAsync<Exception>(() => Task.WhenAll(inFlight));
        }

        api.Start();
        await cluster.WaitUntilServingAsync(cluster.Silos.Count, TimeSpan.FromSeconds(60), api);
        await Task.Delay(TimeSpan.FromSeconds(3.5));

        // The careful client retries every key, five times concurrently, on the restarted node.
        var workload = new Workload([api.BaseAddress!]);
        await workload.RunAsync(options);
        return await Checker.CheckAsync($"api kill -9 mid-action ({prefix.TrimEnd('-')})", cluster, workload, options);
    }
}
