using Orleans.Concurrency;

namespace OrleansIdempotency.Grains;

/// <summary>
/// One idempotency key (<see cref="IdempotencyKey"/>). Calls are served one at a time, so exactly one caller
/// receives a claim, and every change is persisted with an ETag-checked write before it is answered.
/// </summary>
[Alias("OrleansIdempotency.IIdempotencyGrain")]
public interface IIdempotencyGrain : IGrainWithStringKey
{
    /// <summary>
    /// How long a caller waits for any answer. Every call is one short storage operation (or a wait of at most
    /// <see cref="IdempotencyGrain.MaxWait"/>), so a call still unanswered after this most likely went to a silo
    /// that died: the caller learns it in seconds, not after Orleans' 30-second default, and asks again.
    /// </summary>
    public const string CallTimeout = "00:00:05";

    /// <summary>
    /// Claims the key, or says why not. Asking again with the same <see cref="ClaimRequest.AttemptId"/> returns the
    /// same claim, so a caller that lost the answer (a silo died, a message timed out) simply asks again.
    /// </summary>
    [Alias("Claim"), ResponseTimeout(CallTimeout)]
    Task<ClaimResult> ClaimAsync(ClaimRequest request);

    /// <summary>Stores the action's response under a live claim. False when the claim is stale or has lapsed.</summary>
    [Alias("Complete"), ResponseTimeout(CallTimeout)]
    Task<bool> CompleteAsync(ClaimToken token, StoredResponse response);

    /// <summary>Extends a live claim's lease from now. False when the claim is stale or has lapsed.</summary>
    [Alias("Renew"), ResponseTimeout(CallTimeout)]
    Task<bool> RenewAsync(ClaimToken token, TimeSpan lease);

    /// <summary>
    /// Gives the key back so the request may be retried under it: the action failed retryably, or the attempt gave
    /// up before running it. False when <paramref name="attemptId"/> holds no claim; a claim of it still on its way
    /// to storage is then fenced out, so that it cannot land afterwards (see <see cref="IdempotencyTransitions.Release"/>).
    /// </summary>
    /// <param name="attemptId">The attempt that asked for the claim.</param>
    /// <param name="lease">The lease that attempt asked for.</param>
    [Alias("Release"), ResponseTimeout(CallTimeout)]
    Task<bool> ReleaseAsync(Guid attemptId, TimeSpan lease);

    /// <summary>
    /// Gives back the claim <paramref name="token"/> names (see <see cref="IdempotencyTransitions.ReleaseClaim"/>).
    /// True when the key is free after it (in doubt about this claim included); false when another claim holds the key
    /// or is in doubt, or it completed.
    /// </summary>
    [Alias("ReleaseClaim"), ResponseTimeout(CallTimeout)]
    Task<bool> ReleaseClaimAsync(ClaimToken token, TimeSpan lease);

    /// <summary>
    /// Returns when the key leaves its current claim (completed, released, lapsed) or after
    /// <paramref name="timeout"/> (at most <see cref="IdempotencyGrain.MaxWait"/>), whichever comes first; then
    /// claim again to learn the outcome.
    /// Interleaves with other calls, so waiting never delays the holder's completion.
    /// </summary>
    [AlwaysInterleave, Alias("Wait"), ResponseTimeout(CallTimeout)]
    Task WaitAsync(TimeSpan timeout);

    /// <summary>
    /// For operators: settles a key whose outcome is unknown, with the response the action is known to have produced
    /// (the key then replays it) or with null (the key is released and the next request runs the action).
    /// </summary>
    /// <param name="outcome">The known response, or null to release the key.</param>
    /// <param name="claim">
    /// The claim in doubt the operator looked at, or null for whichever is in doubt now. Named, a key that has moved on
    /// to another claim since (re-claimed under <see cref="LapsedLeasePolicy.Reclaim"/>, or after its retention) is left
    /// alone: the decision was made about another attempt.
    /// </param>
    [Alias("ResolveClaim"), ResponseTimeout(CallTimeout)]
    Task<ResolveOutcome> ResolveAsync(StoredResponse? outcome, ClaimToken? claim);

    /// <summary>The record as it stands now (a record past its retention reads as <see cref="IdempotencyStatus.None"/>).</summary>
    [Alias("Get"), ResponseTimeout(CallTimeout)]
    Task<IdempotencyRecord> GetAsync();
}
