namespace OrleansIdempotency.AspNetCore;

/// <summary>Makes minimal-API endpoints and route groups idempotent.</summary>
public static class IdempotencyEndpointConventionBuilderExtensions
{
    /// <summary>Applies the default policy.</summary>
    public static TBuilder RequireIdempotency<TBuilder>(this TBuilder builder)
        where TBuilder : IEndpointConventionBuilder =>
        builder.WithMetadata(new IdempotencyMetadata(null, null));

    /// <summary>Applies the named policy (see <see cref="IdempotencyOptions.AddPolicy(string, IdempotencyPolicy)"/>).</summary>
    public static TBuilder RequireIdempotency<TBuilder>(this TBuilder builder, string policyName)
        where TBuilder : IEndpointConventionBuilder
    {
        ArgumentException.ThrowIfNullOrEmpty(policyName);
        return builder.WithMetadata(new IdempotencyMetadata(policyName, null));
    }

    /// <summary>Applies a policy derived from the default, for example <c>p =&gt; p with { Retention = TimeSpan.FromHours(1) }</c>.</summary>
    public static TBuilder RequireIdempotency<TBuilder>(this TBuilder builder, Func<IdempotencyPolicy, IdempotencyPolicy> configure)
        where TBuilder : IEndpointConventionBuilder
    {
        ArgumentNullException.ThrowIfNull(configure);
        return builder.WithMetadata(new IdempotencyMetadata(null, configure));
    }
}
