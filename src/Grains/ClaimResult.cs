using Orleans.Concurrency;

namespace OrleansIdempotency.Grains;

/// <summary>The answer to a claim.</summary>
[GenerateSerializer, Alias("OrleansIdempotency.ClaimOutcome")]
public enum ClaimOutcome
{
    /// <summary>The caller holds the claim, durably: run the action, then complete or release.</summary>
    Acquired = 0,

    /// <summary>The key completed earlier: replay <see cref="ClaimResult.Response"/>.</summary>
    Completed = 1,

    /// <summary>Another attempt holds the claim: wait for it, or answer 409.</summary>
    InProgress = 2,

    /// <summary>The key was claimed by a different request: refuse (422); nothing runs.</summary>
    Mismatch = 3,

    /// <summary>An earlier attempt's lease ran out without a completion: refuse (409) until an operator resolves it.</summary>
    OutcomeUnknown = 4,
}

/// <summary>The answer to <see cref="IIdempotencyGrain.ClaimAsync"/>.</summary>
/// <param name="Outcome">What the caller should do.</param>
/// <param name="Token">The claim, when <see cref="ClaimOutcome.Acquired"/>.</param>
/// <param name="LeaseExpiresAt">When the current claim lapses, when <see cref="ClaimOutcome.Acquired"/> or <see cref="ClaimOutcome.InProgress"/>.</param>
/// <param name="Response">The stored response, when <see cref="ClaimOutcome.Completed"/>.</param>
/// <param name="ExpiresAt">
/// When <see cref="ClaimOutcome.Completed"/>: when the record's retention ends. Until then the answer cannot change
/// (a completed record is final), so a caller may keep it.
/// </param>
/// <param name="RetainedFor">
/// When <see cref="ClaimOutcome.Completed"/>: how long the retention has left as the grain answered, so that a caller
/// keeping the answer can end it by its own clock, whatever its distance from the silo's (absent from older silos).
/// </param>
[GenerateSerializer, Immutable, Alias("OrleansIdempotency.ClaimResult")]
public sealed record ClaimResult(
    [property: Id(0)] ClaimOutcome Outcome,
    [property: Id(1)] ClaimToken? Token = null,
    [property: Id(2)] DateTimeOffset? LeaseExpiresAt = null,
    [property: Id(3)] StoredResponse? Response = null,
    [property: Id(4)] DateTimeOffset? ExpiresAt = null,
    [property: Id(5)] TimeSpan? RetainedFor = null);
