using Orleans.Concurrency;

namespace OrleansIdempotency.Grains;

/// <summary>What happens to a claim whose lease ran out without a completion.</summary>
[GenerateSerializer, Alias("OrleansIdempotency.LapsedLeasePolicy")]
public enum LapsedLeasePolicy
{
    /// <summary>The key becomes <see cref="IdempotencyStatus.OutcomeUnknown"/>: the action is never re-run silently.</summary>
    OutcomeUnknown = 0,

    /// <summary>The next matching request may claim the key again and re-run the action (at-least-once).</summary>
    Reclaim = 1,
}

/// <summary>An attempt's request to claim a key.</summary>
/// <param name="AttemptId">
/// Identifies this attempt; asking again with the same id after a lost answer returns the same claim (or a fresh one
/// if it lapsed meanwhile). Never ask again with an id that already received <see cref="ClaimOutcome.Acquired"/>.
/// </param>
/// <param name="Fingerprint">SHA-256 of the request (method, route, normalised query, body).</param>
/// <param name="Lease">How long the claim holds without completion or renewal.</param>
/// <param name="Retention">How long the key is remembered after it is claimed or completed.</param>
/// <param name="OnLapsedLease">What a lapsed lease turns into.</param>
/// <param name="AsksAgainOnlyUnanswered">
/// True when the caller asks again with <paramref name="AttemptId"/> only while it has had no answer (this layer's
/// own attempts): a lapsed claim of it never ran, and is given again. False for attempt ids chosen by callers outside
/// (the Once API over HTTP), which may ask again after running: a lapsed claim of theirs is in doubt like any other.
/// Read as false from a caller that predates it.
/// </param>
/// <param name="MayHaveAskedBefore">
/// True when <paramref name="AttemptId"/> may have asked before without hearing the answer, so that its claim may be
/// written though this activation's copy does not show it: written through another activation of the key, while
/// membership changes, whose answer was lost. The grain then reads the record before refusing the claim from its
/// copy, rather than strand the claim (no one would run it, and its lapse would leave the key in doubt). Set on a
/// call's tries after one that failed, and for attempt ids chosen by callers outside, who may be asking again.
/// </param>
[GenerateSerializer, Immutable, Alias("OrleansIdempotency.ClaimRequest")]
public sealed record ClaimRequest(
    [property: Id(0)] Guid AttemptId,
    [property: Id(1)] byte[] Fingerprint,
    [property: Id(2)] TimeSpan Lease,
    [property: Id(3)] TimeSpan Retention,
    [property: Id(4)] LapsedLeasePolicy OnLapsedLease = LapsedLeasePolicy.OutcomeUnknown,
    [property: Id(5)] bool AsksAgainOnlyUnanswered = true,
    [property: Id(6)] bool MayHaveAskedBefore = false);

/// <summary>Proof of a claim: the attempt that holds it and the fencing token it was given.</summary>
[GenerateSerializer, Immutable, Alias("OrleansIdempotency.ClaimToken")]
public readonly record struct ClaimToken([property: Id(0)] Guid AttemptId, [property: Id(1)] long FencingToken);
