namespace OrleansIdempotency.Grains;

/// <summary>A caller's answer and the record to persist before giving it (<c>null</c> when nothing changes).</summary>
public readonly record struct Transition<T>(T Result, IdempotencyRecord? Next);

/// <summary>
/// The key's state machine as pure functions of the stored record and the time, so that it can be checked
/// exhaustively without a cluster. <see cref="IdempotencyGrain"/> applies them one at a time and persists each
/// change before answering.
/// </summary>
public static class IdempotencyTransitions
{
    /// <summary>Asks for the key on behalf of <paramref name="request"/>.</summary>
    public static Transition<ClaimResult> Claim(IdempotencyRecord stored, ClaimRequest request, DateTimeOffset now)
    {
        var current = stored.AsOf(now);

        // DESIGN §4: the same key with a different request is refused, whatever state the key is in; a released key
        // keeps the request it was claimed for until its retention ends (a new or expired one has none).
        if (current.HoldsRequest && !current.Matches(request.Fingerprint))
        {
            return new(new ClaimResult(ClaimOutcome.Mismatch), null);
        }

        if (current.Status == IdempotencyStatus.None)
        {
            return Acquire(current, request, now);
        }

        switch (current.Status)
        {
            case IdempotencyStatus.Completed:
                return new(new ClaimResult(ClaimOutcome.Completed, Response: current.Response, ExpiresAt: current.ExpiresAt, RetainedFor: current.ExpiresAt - now), null);
            case IdempotencyStatus.OutcomeUnknown when current.AttemptId == request.AttemptId && request.AsksAgainOnlyUnanswered:
                // Its lease lapsed while its answer was lost, and a retry found it so first: the doubt was about an
                // attempt that knows it has not run the action (as its late release does, see Release).
                return Acquire(current, request, now);
            case IdempotencyStatus.OutcomeUnknown:
                return new(new ClaimResult(ClaimOutcome.OutcomeUnknown), null);
            case IdempotencyStatus.InProgress when now < current.LeaseExpiresAt:
                // The holder asking again after its answer was lost gets its own claim back (DESIGN §3).
                return current.AttemptId == request.AttemptId
                    ? new(new ClaimResult(ClaimOutcome.Acquired, current.Token, current.LeaseExpiresAt), null)
                    : new(new ClaimResult(ClaimOutcome.InProgress, LeaseExpiresAt: current.LeaseExpiresAt), null);
            case IdempotencyStatus.InProgress when current.AttemptId == request.AttemptId && request.AsksAgainOnlyUnanswered:
                // An attempt that asks again only while it has no answer has not run the action: its lapsed claim is
                // given again, under a new token (a failover can outlast a short lease).
                return Acquire(current, request, now);
            default:
                // The lease lapsed: the holder may have run the action, or died before it could.
                return request.OnLapsedLease == LapsedLeasePolicy.Reclaim
                    ? Acquire(current, request, now)
                    : new(new ClaimResult(ClaimOutcome.OutcomeUnknown), current with { Status = IdempotencyStatus.OutcomeUnknown });
        }
    }

    /// <summary>Stores the outcome of the action, if <paramref name="token"/> still holds a live claim.</summary>
    /// <returns>True when stored (or stored already by this same claim); false for a stale or lapsed claim.</returns>
    public static Transition<bool> Complete(IdempotencyRecord stored, ClaimToken token, StoredResponse response, DateTimeOffset now)
    {
        var current = stored.AsOf(now);
        if (current.Status == IdempotencyStatus.Completed && current.IsHeldBy(token))
        {
            return new(true, null);
        }

        if (!HoldsLiveClaim(current, token, now))
        {
            return new(false, null);
        }

        return new(true, current with
        {
            Status = IdempotencyStatus.Completed,
            Response = response,
            ExpiresAt = now + current.Retention,
        });
    }

    /// <summary>Extends a live claim, for an action that runs longer than its lease.</summary>
    /// <returns>True when extended; false when the claim is stale or has lapsed.</returns>
    public static Transition<bool> Renew(IdempotencyRecord stored, ClaimToken token, TimeSpan lease, DateTimeOffset now)
    {
        var current = stored.AsOf(now);
        // The retention is pushed out with the lease, so the purge never deletes a claim that is still held.
        return HoldsLiveClaim(current, token, now)
            ? new(true, current with { LeaseExpiresAt = now + lease, ExpiresAt = Later(current.ExpiresAt, now + lease + current.Retention) })
            : new(false, null);
    }

    /// <summary>Gives the key back so that the request can be retried: the action failed retryably or never ran.</summary>
    /// <returns>True when the attempt's claim was released; false when it held none.</returns>
    /// <remarks><para>
    /// A claim whose lease lapsed into an unknown outcome is released too when its own attempt asks: the doubt was
    /// about that attempt, which knows what no later caller could, that its action did not take effect. Its release
    /// arrives that late when the store was unreachable as it was first sent (the claim written, its answer lost)
    /// and a retry reached the key first.
    /// </para><para>
    /// An attempt that holds no claim may still have one on its way to storage: its caller gave up on a write that
    /// failed or timed out, and such a write can still land (queued behind a partition, retransmitted). Landing after
    /// this release, it would hold a free key for an attempt that has given up, which then lapses into an unknown
    /// outcome although nothing ran. So a release that finds the key free writes its record again (still free, its
    /// expiry pushed out if need be): every write is checked against the version it was decided on, and this one moves
    /// the version on, so the late claim is refused. The row is kept for <paramref name="lease"/> (the lease the
    /// attempt asked for), after which storage refuses that claim anyway. (A claim decided on a lapsed lease is not
    /// fenced: storage refuses a claim record whose lease is over, which this rewrite would be; such a late re-claim
    /// can only re-run a key whose endpoint asked for re-runs, after one more lease.)
    /// </para></remarks>
    public static Transition<bool> Release(IdempotencyRecord stored, Guid attemptId, TimeSpan lease, DateTimeOffset now)
    {
        var current = stored.AsOf(now);
        if (current.Status is IdempotencyStatus.InProgress or IdempotencyStatus.OutcomeUnknown && current.AttemptId == attemptId)
        {
            return new(true, Released(current));
        }

        return new(false, current.Status == IdempotencyStatus.None ? current with { ExpiresAt = Later(current.ExpiresAt, now + lease) } : null);
    }

    /// <summary>
    /// Gives back the claim <paramref name="token"/> names, as its holder does when the operation did not take effect:
    /// <see cref="Release"/> for that claim alone, not for a later claim of the same attempt (one that asked again
    /// after its lease lapsed, under <see cref="LapsedLeasePolicy.Reclaim"/>).
    /// </summary>
    /// <returns>
    /// True when the key is free after it: released now (in doubt about this claim included), or free already (a
    /// release asked again after its answer was lost); false when another claim holds the key or is in doubt, or it
    /// completed.
    /// </returns>
    public static Transition<bool> ReleaseClaim(IdempotencyRecord stored, ClaimToken token, TimeSpan lease, DateTimeOffset now)
    {
        var current = stored.AsOf(now);
        if (current.Status is IdempotencyStatus.InProgress or IdempotencyStatus.OutcomeUnknown && !current.IsHeldBy(token))
        {
            return new(false, null);
        }

        var released = Release(stored, token.AttemptId, lease, now);
        return released with { Result = released.Result || current.Status == IdempotencyStatus.None };
    }

    /// <summary>
    /// Settles a key whose outcome is in doubt (<see cref="IdempotencyStatus.OutcomeUnknown"/>, or a lapsed lease), as
    /// an operator who found out what happened does: with the response the action produced, the key completes and
    /// replays it; with none, it is released and the next request runs the action.
    /// </summary>
    /// <returns>Settled, or why nothing changed.</returns>
    public static Transition<ResolveOutcome> Resolve(IdempotencyRecord stored, StoredResponse? outcome, ClaimToken? claim, DateTimeOffset now)
    {
        var current = stored.AsOf(now);
        var inDoubt = current.Status == IdempotencyStatus.OutcomeUnknown
            || (current.Status == IdempotencyStatus.InProgress && now >= current.LeaseExpiresAt);
        if (!inDoubt)
        {
            // A resolution asked again because its answer was lost (its write landed, the call timed out) finds the
            // key as it left it: that is settled, not "nothing changed".
            return new(claim is { } asked && SettledBy(current, asked, outcome) ? ResolveOutcome.Settled : ResolveOutcome.NotInDoubt, null);
        }

        // The decision was about the claim the operator named (null: whichever is in doubt).
        if (claim is { } named && !current.IsHeldBy(named))
        {
            return new(ResolveOutcome.OtherClaim, null);
        }

        // Completed under a token of its own: the attempt in doubt may still be alive, and its completion must not pass
        // for the settled one (Complete accepts a repeat from the claim a record was completed under).
        return new(ResolveOutcome.Settled, outcome is null
            ? Released(current)
            : current with
            {
                Status = IdempotencyStatus.Completed,
                Response = outcome,
                AttemptId = Guid.Empty,
                FencingToken = current.FencingToken + 1,
                ExpiresAt = now + current.Retention,
            });
    }

    private static DateTimeOffset Later(DateTimeOffset a, DateTimeOffset b) => a > b ? a : b;

    // The key free again: the row stays until its retention ends, so that fencing tokens keep rising and the request
    // it was claimed for is the only one that may claim it again.
    private static IdempotencyRecord Released(IdempotencyRecord claimed) => new()
    {
        Fingerprint = claimed.Fingerprint,
        FencingToken = claimed.FencingToken,
        ExpiresAt = claimed.ExpiresAt,
    };

    // True when current is what Resolve made of claim's record with outcome (see its two results).
    private static bool SettledBy(IdempotencyRecord current, ClaimToken claim, StoredResponse? outcome) => outcome is null
        ? current.Status == IdempotencyStatus.None && current.FencingToken == claim.FencingToken
        : current is { Status: IdempotencyStatus.Completed, Response: { } stored } && current.AttemptId == Guid.Empty
            && current.FencingToken == claim.FencingToken + 1 && stored.StatusCode == outcome.StatusCode
            && stored.BodyOmitted == outcome.BodyOmitted && stored.Body.AsSpan().SequenceEqual(outcome.Body)
            && stored.Headers.SequenceEqual(outcome.Headers);

    private static bool HoldsLiveClaim(IdempotencyRecord current, ClaimToken token, DateTimeOffset now) =>
        current.Status == IdempotencyStatus.InProgress && current.IsHeldBy(token) && now < current.LeaseExpiresAt;

    private static Transition<ClaimResult> Acquire(IdempotencyRecord current, ClaimRequest request, DateTimeOffset now)
    {
        var next = new IdempotencyRecord
        {
            Status = IdempotencyStatus.InProgress,
            Fingerprint = request.Fingerprint,
            AttemptId = request.AttemptId,
            FencingToken = current.FencingToken + 1,
            LeaseExpiresAt = now + request.Lease,
            CreatedAt = now,
            ExpiresAt = now + request.Retention,
            Retention = request.Retention,
        };
        return new(new ClaimResult(ClaimOutcome.Acquired, next.Token, next.LeaseExpiresAt), next);
    }
}
