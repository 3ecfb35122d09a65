namespace OrleansIdempotency.AspNetCore;

/// <summary>Endpoint metadata that makes the endpoint idempotent.</summary>
public interface IIdempotencyMetadata
{
    /// <summary>The named policy to apply (see <see cref="IdempotencyOptions.AddPolicy(string, IdempotencyPolicy)"/>), or null.</summary>
    string? PolicyName { get; }

    /// <summary>The endpoint's own policy, derived from the default, or null.</summary>
    Func<IdempotencyPolicy, IdempotencyPolicy>? Configure { get; }
}

/// <summary>Makes a controller or action idempotent: a repeated request with the same <c>Idempotency-Key</c> runs once.</summary>
[AttributeUsage(AttributeTargets.Class | AttributeTargets.Method, AllowMultiple = false, Inherited = true)]
public sealed class IdempotentAttribute : Attribute, IIdempotencyMetadata
{
    /// <summary>The named policy to apply; the default policy when null.</summary>
    public string? PolicyName { get; init; }

    Func<IdempotencyPolicy, IdempotencyPolicy>? IIdempotencyMetadata.Configure => null;
}

internal sealed class IdempotencyMetadata(string? policyName, Func<IdempotencyPolicy, IdempotencyPolicy>? configure, string? route = null)
    : IIdempotencyMetadata
{
    public string? PolicyName { get; } = policyName;

    public Func<IdempotencyPolicy, IdempotencyPolicy>? Configure { get; } = configure;

    /// <summary>What tells the endpoint apart from others on its path (a gateway route's id), or null.</summary>
    public string? Route { get; } = route;
}
