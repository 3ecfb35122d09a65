using OrleansIdempotency.Grains;

namespace OrleansIdempotency.Bench;

/// <summary>
/// What a new key asks of Orleans and nothing else: an activation, the two calls of a new key with the key grain's
/// argument and result types, and the deactivation that follows the completion. No record, no storage, no transition:
/// the grain benchmark sets its cost beside the key grain's to show how much of a new key is Orleans' own floor.
/// </summary>
[Alias("OrleansIdempotency.Bench.IFloorGrain")]
public interface IFloorGrain : IGrainWithStringKey
{
    [Alias("Claim"), ResponseTimeout(IIdempotencyGrain.CallTimeout)]
    Task<ClaimResult> ClaimAsync(ClaimRequest request);

    [Alias("Complete"), ResponseTimeout(IIdempotencyGrain.CallTimeout)]
    Task<bool> CompleteAsync(ClaimToken token, StoredResponse response);
}

public sealed class FloorGrain : Grain, IFloorGrain
{
    public Task<ClaimResult> ClaimAsync(ClaimRequest request) =>
        Task.FromResult(new ClaimResult(ClaimOutcome.Acquired, new ClaimToken(request.AttemptId, 1)));

    public Task<bool> CompleteAsync(ClaimToken token, StoredResponse response)
    {
        DeactivateOnIdle();
        return Task.FromResult(true);
    }
}
