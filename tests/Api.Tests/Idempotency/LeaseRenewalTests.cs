using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Testing;
using OrleansIdempotency.Grains;

namespace OrleansIdempotency.AspNetCore.Tests;

/// <summary>The renewals that keep a long action's claim: they go on through failures, their own log's included.</summary>
[Collection(MiddlewareClusterCollection.Name)]
public sealed class LeaseRenewalTests(MiddlewareClusterFixture fixture)
{
    [Fact]
    public async Task RenewalWhoseFailureCannotBeLogged_IsTriedAgain_AndTheClaimIsKept()
    {
        var lease = IdempotencyPolicy.Default.Lease;
        var grain = fixture.Grains.GetIdempotencyGrain(new IdempotencyKey("user:alice", MiddlewareHarness.NewKey()));
        var claimedAt = fixture.Time.GetUtcNow();
        var claim = await grain.ClaimAsync(new ClaimRequest(Guid.NewGuid(), new byte[32], lease, TimeSpan.FromHours(1)));
        var log = new FailingLog("renewing the lease failed");

        // The renewal's timer runs on the fake clock: a failure escaping it (a throw from an async void) would end the
        // process, or here fail the test, and no renewal would follow.
        using var renewal = new LeaseRenewal(grain, claim.Token!.Value, claimedAt + lease, lease, fixture.Time, log);
        await fixture.WhileStoreDownAsync(async () =>
        {
            await fixture.ClockRunsUntilAsync(() => log.Failures > 0);
            return true;
        });

        await fixture.ClockRunsUntilAsync(async () => (await grain.GetAsync()).LeaseExpiresAt > claimedAt + lease);
        Assert.Equal(IdempotencyStatus.InProgress, (await grain.GetAsync()).Status);
    }

    [Fact]
    public async Task RenewalRefused_ForTheClaimIsNoLongerHeld_IsAnErrorNamingTheKey_AndTheRenewalsStop()
    {
        var lease = IdempotencyPolicy.Default.Lease;
        var grain = fixture.Grains.GetIdempotencyGrain(new IdempotencyKey("user:alice", MiddlewareHarness.NewKey()));
        var attempt = Guid.NewGuid();
        var claimedAt = fixture.Time.GetUtcNow();
        var claim = await grain.ClaimAsync(new ClaimRequest(attempt, new byte[32], lease, TimeSpan.FromHours(1)));
        var log = new FakeLogger<LeaseRenewal>();
        using var renewal = new LeaseRenewal(grain, claim.Token!.Value, claimedAt + lease, lease, fixture.Time, log);

        // Settled under the action's feet (an operator, say): the action runs on without a claim.
        Assert.True(await grain.ReleaseAsync(attempt, lease));
        await fixture.ClockRunsUntilAsync(() => log.Collector.Count > 0);
        await fixture.RunClockAsync(lease);

        var lost = Assert.Single(log.Collector.GetSnapshot());
        Assert.Equal(LogLevel.Error, lost.Level);
        Assert.Contains(grain.GetPrimaryKeyString(), lost.Message, StringComparison.Ordinal);
        Assert.Contains(ClaimTokenText.Format(claim.Token!.Value), lost.Message, StringComparison.Ordinal);
    }
}
