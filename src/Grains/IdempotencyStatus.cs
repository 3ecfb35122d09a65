namespace OrleansIdempotency.Grains;

/// <summary>Where a key stands in its life: <c>None → InProgress → Completed | OutcomeUnknown</c>.</summary>
[GenerateSerializer, Alias("OrleansIdempotency.IdempotencyStatus")]
public enum IdempotencyStatus
{
    /// <summary>Nobody holds the key: never claimed, released, or past its retention.</summary>
    None = 0,

    /// <summary>One attempt holds a claim with a lease and may be running the action.</summary>
    InProgress = 1,

    /// <summary>The action finished; its response is stored and replayed until the key expires.</summary>
    Completed = 2,

    /// <summary>A lease ran out without a completion: the action may or may not have run. Never re-run silently.</summary>
    OutcomeUnknown = 3,
}
