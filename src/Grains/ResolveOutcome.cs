namespace OrleansIdempotency.Grains;

/// <summary>The answer to <see cref="IIdempotencyGrain.ResolveAsync"/>.</summary>
[GenerateSerializer, Alias("OrleansIdempotency.ResolveOutcome")]
public enum ResolveOutcome
{
    /// <summary>The key was in doubt and is settled.</summary>
    Settled = 0,

    /// <summary>The key is free, held under a live lease, or completed: nothing changed.</summary>
    NotInDoubt = 1,

    /// <summary>The key is in doubt, but for another claim than the one named: nothing changed; read it again.</summary>
    OtherClaim = 2,
}
