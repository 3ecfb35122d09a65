using static OrleansIdempotency.Grains.IdempotencyTransitions;

namespace OrleansIdempotency.Grains.Tests;

public sealed class IdempotencyTransitionsTests
{
    private static readonly DateTimeOffset T0 = new(2026, 1, 1, 0, 0, 0, TimeSpan.Zero);
    private static readonly TimeSpan Lease = TimeSpan.FromSeconds(30);
    private static readonly TimeSpan Retention = TimeSpan.FromHours(24);
    private static readonly byte[] RequestA = [1, 2, 3];
    private static readonly byte[] RequestB = [1, 2, 4];
    private static readonly StoredResponse Created = new(201, [new("Location", "/orders/1")], "{\"id\":1}"u8.ToArray(), false, 8);

    private static ClaimRequest Request(Guid? attempt = null, byte[]? fingerprint = null, LapsedLeasePolicy policy = LapsedLeasePolicy.OutcomeUnknown) =>
        new(attempt ?? Guid.NewGuid(), fingerprint ?? RequestA, Lease, Retention, policy);

    private static (IdempotencyRecord Record, ClaimToken Token) Claimed(ClaimRequest? request = null, DateTimeOffset? at = null)
    {
        var (result, next) = Claim(new IdempotencyRecord(), request ?? Request(), at ?? T0);
        return (next!, result.Token!.Value);
    }

    [Fact]
    public void Claim_NewKey_AcquiresWithLeaseAndFirstFencingToken()
    {
        var attempt = Guid.NewGuid();
        var (result, next) = Claim(new IdempotencyRecord(), Request(attempt), T0);

        Assert.Equal(ClaimOutcome.Acquired, result.Outcome);
        Assert.Equal(new ClaimToken(attempt, 1), result.Token);
        Assert.Equal(T0 + Lease, result.LeaseExpiresAt);
        Assert.NotNull(next);
        Assert.Equal(IdempotencyStatus.InProgress, next.Status);
        Assert.Equal(T0 + Retention, next.ExpiresAt);
    }

    [Fact]
    public void Claim_SameAttemptAgain_ReturnsTheSameClaimWithoutWriting()
    {
        var request = Request();
        var (record, token) = Claimed(request);

        var (result, next) = Claim(record, request, T0 + TimeSpan.FromSeconds(5));

        Assert.Equal(ClaimOutcome.Acquired, result.Outcome);
        Assert.Equal(token, result.Token);
        Assert.Null(next);
    }

    [Fact]
    public void Claim_OtherAttemptWhileLeaseLive_IsInProgress()
    {
        var (record, _) = Claimed();

        var (result, next) = Claim(record, Request(), T0 + TimeSpan.FromSeconds(5));

        Assert.Equal(ClaimOutcome.InProgress, result.Outcome);
        Assert.Equal(T0 + Lease, result.LeaseExpiresAt);
        Assert.Null(result.Token);
        Assert.Null(next);
    }

    [Fact]
    public void Claim_DifferentRequestUnderSameKey_IsMismatchInEveryState()
    {
        var (inProgress, token) = Claimed();
        var completed = Complete(inProgress, token, Created, T0).Next!;
        var unknown = Claim(inProgress, Request(), T0 + Lease).Next!;

        foreach (var record in new[] { inProgress, completed, unknown })
        {
            var (result, next) = Claim(record, Request(fingerprint: RequestB), T0 + TimeSpan.FromSeconds(1));
            Assert.Equal(ClaimOutcome.Mismatch, result.Outcome);
            Assert.Null(next);
        }
    }

    [Fact]
    public void Complete_ThenClaim_ReplaysTheStoredResponse()
    {
        var (record, token) = Claimed();
        var (stored, completed) = Complete(record, token, Created, T0 + TimeSpan.FromSeconds(2));

        var (result, next) = Claim(completed!, Request(), T0 + TimeSpan.FromSeconds(3));

        Assert.True(stored);
        Assert.Equal(ClaimOutcome.Completed, result.Outcome);
        Assert.Same(Created, result.Response);
        Assert.Null(next);
        Assert.Equal(T0 + TimeSpan.FromSeconds(2) + Retention, completed!.ExpiresAt);
        Assert.Equal(completed.ExpiresAt, result.ExpiresAt);
        // What is left of the retention as the grain answers, for a caller whose clock is not the silo's.
        Assert.Equal(Retention - TimeSpan.FromSeconds(1), result.RetainedFor);
    }

    [Fact]
    public void Complete_SameClaimTwice_IsAcceptedOnceAndStaysIdempotent()
    {
        var (record, token) = Claimed();
        var completed = Complete(record, token, Created, T0).Next!;

        var (stored, next) = Complete(completed, token, Created, T0 + TimeSpan.FromSeconds(1));

        Assert.True(stored);
        Assert.Null(next);
    }

    [Fact]
    public void Complete_WithStaleFencingToken_IsRefused()
    {
        var (record, token) = Claimed();
        var stale = token with { FencingToken = token.FencingToken - 1 };
        var otherAttempt = token with { AttemptId = Guid.NewGuid() };

        Assert.Equal(new Transition<bool>(false, null), Complete(record, stale, Created, T0));
        Assert.Equal(new Transition<bool>(false, null), Complete(record, otherAttempt, Created, T0));
    }

    [Fact]
    public void Complete_AfterLeaseLapsed_IsRefused()
    {
        var (record, token) = Claimed();

        Assert.Equal(new Transition<bool>(false, null), Complete(record, token, Created, T0 + Lease));
    }

    [Fact]
    public void Complete_AfterLapseAndReclaim_OldHolderIsRefused()
    {
        var (record, oldToken) = Claimed();
        var (reclaim, reclaimed) = Claim(record, Request(policy: LapsedLeasePolicy.Reclaim), T0 + Lease);

        Assert.Equal(ClaimOutcome.Acquired, reclaim.Outcome);
        Assert.Equal(oldToken.FencingToken + 1, reclaim.Token!.Value.FencingToken);
        Assert.False(Complete(reclaimed!, oldToken, Created, T0 + Lease).Result);
        Assert.True(Complete(reclaimed!, reclaim.Token!.Value, Created, T0 + Lease).Result);
    }

    [Fact]
    public void Claim_AfterLeaseLapsed_BecomesOutcomeUnknownByDefault()
    {
        var (record, _) = Claimed();

        var (result, next) = Claim(record, Request(), T0 + Lease);

        Assert.Equal(ClaimOutcome.OutcomeUnknown, result.Outcome);
        Assert.Equal(IdempotencyStatus.OutcomeUnknown, next!.Status);
        Assert.Equal(ClaimOutcome.OutcomeUnknown, Claim(next, Request(), T0 + Lease * 2).Result.Outcome);
    }

    [Fact]
    public void Claim_SameAttemptAfterItsLeaseLapsed_GetsAFreshClaimUnderANewToken()
    {
        // The attempt never heard back, so it never ran the action: nothing is in doubt.
        var request = Request();
        var (record, token) = Claimed(request);

        var (result, next) = Claim(record, request, T0 + Lease);

        Assert.Equal(ClaimOutcome.Acquired, result.Outcome);
        Assert.Equal(token.FencingToken + 1, result.Token!.Value.FencingToken);
        Assert.False(Complete(next!, token, Created, T0 + Lease).Result);
    }

    [Fact]
    public void Claim_SameOutsideAttemptAfterItsLeaseLapsed_IsInDoubt_NotGivenAgain()
    {
        // An attempt id chosen outside the layer may ask again after it ran the action (a worker that restarted).
        var request = Request() with { AsksAgainOnlyUnanswered = false };
        var (record, token) = Claimed(request);

        Assert.Equal(ClaimOutcome.Acquired, Claim(record, request, T0 + Lease / 2).Result.Outcome);
        var (result, next) = Claim(record, request, T0 + Lease);

        Assert.Equal(ClaimOutcome.OutcomeUnknown, result.Outcome);
        Assert.Equal(IdempotencyStatus.OutcomeUnknown, next!.Status);
        Assert.False(Complete(next, token, Created, T0 + Lease).Result);
    }

    [Fact]
    public void Claim_SameAttemptAskingAgain_AfterAnotherFoundItsClaimLapsed_GetsAFreshClaim_ForItNeverRan()
    {
        // Its answer lost in a failover longer than the lease; a retry got there first and found the lease lapsed.
        var request = Request();
        var (record, token) = Claimed(request);
        var unknown = Claim(record, Request(), T0 + Lease).Next!;

        var (result, next) = Claim(unknown, request, T0 + Lease + TimeSpan.FromSeconds(1));

        Assert.Equal(ClaimOutcome.Acquired, result.Outcome);
        Assert.Equal(token.FencingToken + 1, result.Token!.Value.FencingToken);
        Assert.Equal(IdempotencyStatus.InProgress, next!.Status);
        Assert.False(Complete(next, token, Created, T0 + Lease).Result);
        Assert.Equal(ClaimOutcome.OutcomeUnknown, Claim(unknown, request with { AsksAgainOnlyUnanswered = false }, T0 + Lease).Result.Outcome);
        Assert.Equal(ClaimOutcome.OutcomeUnknown, Claim(unknown, Request(), T0 + Lease).Result.Outcome);
    }

    [Fact]
    public void InProgressRecord_WithALiveLease_OutlivesItsRetention_AndRenewalPushesTheRetentionOut()
    {
        var (renewed, token) = Claimed();
        var now = T0;
        while (now < T0 + Retention)
        {
            now += Lease / 3;
            renewed = Renew(renewed, token, Lease, now).Next!;
        }

        Assert.True(renewed.ExpiresAt >= now + Lease + Retention);
        Assert.Equal(IdempotencyStatus.InProgress, renewed.AsOf(T0 + Retention + TimeSpan.FromSeconds(10)).Status);
        Assert.Equal(ClaimOutcome.InProgress, Claim(renewed, Request(), T0 + Retention + TimeSpan.FromSeconds(10)).Result.Outcome);
        Assert.True(Complete(renewed, token, Created, T0 + Retention + TimeSpan.FromSeconds(10)).Result);
    }

    [Fact]
    public void Renew_LiveClaim_ExtendsLeaseFromNow()
    {
        var (record, token) = Claimed();
        var now = T0 + TimeSpan.FromSeconds(20);

        var (renewed, next) = Renew(record, token, Lease, now);

        Assert.True(renewed);
        Assert.Equal(now + Lease, next!.LeaseExpiresAt);
        Assert.True(Complete(next, token, Created, T0 + Lease + TimeSpan.FromSeconds(1)).Result);
    }

    [Fact]
    public void Renew_LapsedOrStaleClaim_IsRefused()
    {
        var (record, token) = Claimed();

        Assert.False(Renew(record, token, Lease, T0 + Lease).Result);
        Assert.False(Renew(record, token with { FencingToken = 7 }, Lease, T0).Result);
    }

    [Fact]
    public void Release_LetsTheNextAttemptClaimWithAHigherFencingToken()
    {
        var request = Request();
        var (record, token) = Claimed(request);

        var (released, next) = Release(record, request.AttemptId, Lease, T0 + TimeSpan.FromSeconds(1));
        var reclaim = Claim(next!, Request(), T0 + TimeSpan.FromSeconds(2)).Result;

        Assert.True(released);
        Assert.Equal(IdempotencyStatus.None, next!.Status);
        Assert.Equal(ClaimOutcome.Acquired, reclaim.Outcome);
        Assert.Equal(token.FencingToken + 1, reclaim.Token!.Value.FencingToken);
        Assert.False(Complete(next, token, Created, T0 + TimeSpan.FromSeconds(2)).Result);
    }

    [Fact]
    public void ReleasedKey_RefusesADifferentRequest_UntilItsRetentionEnds()
    {
        // DESIGN §2: within the key's retention a different request under it is refused, released or not (a client
        // that reused a key for another request after a 503).
        var request = Request();
        var (record, token) = Claimed(request);
        var released = Release(record, request.AttemptId, Lease, T0 + TimeSpan.FromSeconds(1)).Next!;
        var unknown = Claim(record, Request(), T0 + Lease).Next!;
        var resolved = Resolve(unknown, null, token, T0 + Lease * 2).Next!;

        foreach (var free in new[] { released, resolved })
        {
            Assert.Equal(new Transition<ClaimResult>(new ClaimResult(ClaimOutcome.Mismatch), null), Claim(free, Request(fingerprint: RequestB), T0 + Lease * 2));
            Assert.Equal(ClaimOutcome.Acquired, Claim(free, Request(), T0 + Lease * 2).Result.Outcome);
            Assert.Equal(ClaimOutcome.Acquired, Claim(free, Request(fingerprint: RequestB), T0 + Retention).Result.Outcome);
        }
    }

    [Fact]
    public void Release_ByAnotherAttemptOfALiveClaim_OrOfACompletedKey_ChangesNothing()
    {
        var (record, token) = Claimed();
        var completed = Complete(record, token, Created, T0).Next!;

        Assert.Equal(new Transition<bool>(false, null), Release(record, Guid.NewGuid(), Lease, T0));
        Assert.Equal(new Transition<bool>(false, null), Release(completed, token.AttemptId, Lease, T0));
    }

    [Fact]
    public void Release_ByAnAttemptWithoutAClaim_OfAFreeKey_WritesTheRecordAgain_KeptForThatAttemptsLease()
    {
        var (record, token) = Claimed();
        var freed = Release(record, token.AttemptId, Lease, T0).Next!;

        foreach (var free in new[] { new IdempotencyRecord(), freed })
        {
            var (released, next) = Release(free, Guid.NewGuid(), Lease, T0 + TimeSpan.FromSeconds(1));

            Assert.False(released);
            Assert.NotNull(next);
            Assert.Equal(IdempotencyStatus.None, next.Status);
            Assert.Equal(free.FencingToken, next.FencingToken);
            Assert.True(next.PurgeableAt >= T0 + TimeSpan.FromSeconds(1) + Lease);
        }
    }

    [Fact]
    public void Release_ByTheAttemptInDoubt_FreesTheKey_ByAnotherChangesNothing()
    {
        // Its release came late (the store was down as it was first sent) and a retry found the lease lapsed first.
        var request = Request();
        var (record, token) = Claimed(request);
        var unknown = Claim(record, Request(), T0 + Lease).Next!;

        var (released, next) = Release(unknown, request.AttemptId, Lease, T0 + Lease * 2);

        Assert.True(released);
        Assert.Equal(IdempotencyStatus.None, next!.Status);
        Assert.Equal(token.FencingToken, next.FencingToken);
        Assert.Equal(ClaimOutcome.Acquired, Claim(next, Request(), T0 + Lease * 2).Result.Outcome);
        Assert.Equal(new Transition<bool>(false, null), Release(unknown, Guid.NewGuid(), Lease, T0 + Lease * 2));
        Assert.True(ReleaseClaim(unknown, token, Lease, T0 + Lease * 2).Result);
        Assert.Equal(new Transition<bool>(false, null), ReleaseClaim(unknown, token with { FencingToken = token.FencingToken + 1 }, Lease, T0 + Lease * 2));
    }

    [Fact]
    public void Release_ByAnotherAttempt_OfALapsedClaim_ChangesNothing()
    {
        var (record, _) = Claimed();

        Assert.Equal(new Transition<bool>(false, null), Release(record, Guid.NewGuid(), Lease, T0 + Lease));
    }

    [Fact]
    public void Claim_AfterRetention_TreatsTheKeyAsNewButKeepsFencingTokensRising()
    {
        var (record, token) = Claimed();
        var completed = Complete(record, token, Created, T0).Next!;

        var (result, next) = Claim(completed, Request(fingerprint: RequestB), T0 + Retention);

        Assert.Equal(ClaimOutcome.Acquired, result.Outcome);
        Assert.Equal(token.FencingToken + 1, result.Token!.Value.FencingToken);
        Assert.Null(next!.Response);
    }

    [Fact]
    public void Resolve_OutcomeUnknown_WithTheKnownResponse_CompletesAndReplaysIt()
    {
        var (record, _) = Claimed();
        var unknown = Claim(record, Request(), T0 + Lease).Next!;

        var (resolved, next) = Resolve(unknown, Created, null, T0 + Lease * 2);

        Assert.Equal(ResolveOutcome.Settled, resolved);
        Assert.Same(Created, Claim(next!, Request(), T0 + Lease * 2).Result.Response);
    }

    [Fact]
    public void Resolve_ALapsedClaimWithTheKnownResponse_RefusesTheHoldersLateCompletion()
    {
        // The holder was alive all along (its renewals failed): its completion must not pass for the settled one.
        var (record, token) = Claimed();
        var settled = Resolve(record, Created, token, T0 + Lease * 2).Next!;
        var late = new StoredResponse(201, [], "{\"id\":2}"u8.ToArray(), false, 8);

        Assert.False(Complete(settled, token, late, T0 + Lease * 2).Result);
        Assert.False(Renew(settled, token, Lease, T0 + Lease * 2).Result);
        Assert.Same(Created, Claim(settled, Request(), T0 + Lease * 2).Result.Response);
    }

    [Fact]
    public void Resolve_OutcomeUnknown_WithNoResponse_ReleasesTheKeyForTheNextRequest()
    {
        var (record, token) = Claimed();
        var unknown = Claim(record, Request(), T0 + Lease).Next!;

        var next = Resolve(unknown, null, token, T0 + Lease * 2).Next!;
        var retry = Claim(next, Request(), T0 + Lease * 2).Result;

        Assert.Equal(ClaimOutcome.Acquired, retry.Outcome);
        Assert.True(retry.Token!.Value.FencingToken > token.FencingToken);
    }

    [Fact]
    public void Resolve_AKeyNotInDoubt_ChangesNothing()
    {
        var (record, token) = Claimed();
        var completed = Complete(record, token, Created, T0).Next!;

        Assert.Equal(new Transition<ResolveOutcome>(ResolveOutcome.NotInDoubt, null), Resolve(record, null, null, T0 + TimeSpan.FromSeconds(1)));
        Assert.Equal(new Transition<ResolveOutcome>(ResolveOutcome.NotInDoubt, null), Resolve(completed, null, token, T0 + Lease * 2));
    }

    [Fact]
    public void Resolve_AskedAgainAfterItsAnswerWasLost_AnswersSettled_AndChangesNothing()
    {
        var (record, token) = Claimed();
        var completed = Resolve(record, Created, token, T0 + Lease * 2).Next!;
        var released = Resolve(record, null, token, T0 + Lease * 2).Next!;
        // As the record comes back from storage: equal, not the same objects.
        var again = new StoredResponse(Created.StatusCode, [.. Created.Headers], [.. Created.Body], false, Created.BodyLength);
        var other = again with { Body = "{\"id\":8}"u8.ToArray() };

        Assert.Equal(new Transition<ResolveOutcome>(ResolveOutcome.Settled, null), Resolve(completed, again, token, T0 + Lease * 3));
        Assert.Equal(new Transition<ResolveOutcome>(ResolveOutcome.Settled, null), Resolve(released, null, token, T0 + Lease * 3));
        Assert.Equal(ResolveOutcome.NotInDoubt, Resolve(completed, other, token, T0 + Lease * 3).Result);
        Assert.Equal(ResolveOutcome.NotInDoubt, Resolve(completed, null, token, T0 + Lease * 3).Result);
        Assert.Equal(ResolveOutcome.NotInDoubt, Resolve(completed, again, null, T0 + Lease * 3).Result);
    }

    [Fact]
    public void Resolve_NamingAClaimThatNoLongerHoldsTheKey_ChangesNothing_EvenWithAnotherClaimInDoubt()
    {
        // The operator read claim 1 in doubt; the key was reclaimed (claim 2), which lapsed in turn.
        var (record, first) = Claimed();
        var reclaim = Request(Guid.NewGuid(), policy: LapsedLeasePolicy.Reclaim);
        var (claim, reclaimed) = Claim(record, reclaim, T0 + Lease);
        var second = claim.Token!.Value;

        Assert.Equal(new Transition<ResolveOutcome>(ResolveOutcome.OtherClaim, null), Resolve(reclaimed!, null, first, T0 + Lease * 3));
        Assert.Equal(new Transition<ResolveOutcome>(ResolveOutcome.OtherClaim, null),
            Resolve(reclaimed!, Created, first with { FencingToken = second.FencingToken }, T0 + Lease * 3));
        Assert.Equal(ResolveOutcome.Settled, Resolve(reclaimed!, Created, second, T0 + Lease * 3).Result);
    }
}
