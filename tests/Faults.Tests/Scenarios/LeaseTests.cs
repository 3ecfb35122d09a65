using System.Net;
using OrleansIdempotency.Faults.Tests.Harness;
using Xunit.Abstractions;

namespace OrleansIdempotency.Faults.Tests.Scenarios;

[Trait("Category", "Long")]
public sealed class LeaseTests(ITestOutputHelper output)
{
    private static readonly Dictionary<string, string> ShortLease = new() { ["Idempotency__Lease"] = "00:00:02" };

    [Fact]
    public async Task ActionLongerThanItsLease_KeepsItsClaimByRenewal_AndIsStoredOnce()
    {
        await using var cluster = await FaultCluster.StartAsync(silos: 2, apis: 1, apiSettings: ShortLease);
        using var client = Orders.Client(cluster.Apis[0]);
        var key = "renewal-" + Guid.NewGuid();

        var first = Orders.SendAsync(client, key, delayMs: 7000);
        await Task.Delay(TimeSpan.FromSeconds(4));
        var duringAction = await Orders.SendAsync(client, key, delayMs: 0);
        var original = await first;
        var after = await Orders.SendAsync(client, key, delayMs: 0);

        var sideEffects = (await cluster.SideEffectsAsync("demo_orders", key)).GetValueOrDefault(key);
        FaultReport.Write(output, $"lease renewal: action 7 s, lease 2 s: first={(int)original.Status} duplicate-during={(int)duringAction.Status} replay-after={(int)after.Status} side-effects={sideEffects}");
        Assert.Equal(HttpStatusCode.Created, original.Status);
        Assert.Equal(HttpStatusCode.Created, duringAction.Status);
        Assert.Equal(original.Body, duringAction.Body);
        Assert.Equal(original.Body, after.Body);
        Assert.Equal(1, sideEffects);
    }

    [Fact]
    public async Task ActionThatOutlivesItsLease_WhileItsProcessIsFrozen_CannotCompleteWithItsStaleClaim()
    {
        await using var cluster = await FaultCluster.StartAsync(silos: 2, apis: 2, apiSettings: ShortLease);
        using var frozen = Orders.Client(cluster.Apis[0]);
        using var other = Orders.Client(cluster.Apis[1]);
        var key = "stale-" + Guid.NewGuid();

        var first = Orders.SendAsync(frozen, key, delayMs: 3000);
        await cluster.WaitUntilClaimedAsync([key], TimeSpan.FromSeconds(30));
        cluster.Apis[0].Pause();
        await Task.Delay(TimeSpan.FromSeconds(4));
        var whileFrozen = await Orders.SendAsync(other, key, delayMs: 0);
        cluster.Apis[0].Resume();
        var original = await first;
        var after = await Orders.SendAsync(other, key, delayMs: 0);

        var sideEffects = (await cluster.SideEffectsAsync("demo_orders", key)).GetValueOrDefault(key);
        FaultReport.Write(output, $"stale lease: frozen holder: first={(int)original.Status} while-frozen={(int)whileFrozen.Status} after={(int)after.Status} side-effects={sideEffects}");
        // The lease lapsed while the holder was frozen: its outcome became unknown, and its late completion was refused.
        Assert.Equal(HttpStatusCode.Conflict, whileFrozen.Status);
        Assert.Contains("outcome-unknown", whileFrozen.Text, StringComparison.Ordinal);
        Assert.Equal(HttpStatusCode.Created, original.Status);
        Assert.Equal(HttpStatusCode.Conflict, after.Status);
        Assert.Contains("outcome-unknown", after.Text, StringComparison.Ordinal);
        Assert.Equal(1, sideEffects);
    }
}
