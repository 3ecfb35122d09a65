using System.Globalization;

namespace OrleansIdempotency.Grains;

/// <summary>An idempotency key within its scope (a user, a tenant, an API key): one grain each.</summary>
/// <param name="Scope">Whose key it is. The same key in two scopes names two independent keys.</param>
/// <param name="Key">The client's <c>Idempotency-Key</c>.</param>
public readonly record struct IdempotencyKey(string Scope, string Key)
{
    /// <summary>The grain's primary key. The scope is length-prefixed, so no scope or key can forge another pair.</summary>
    public string ToGrainKey() => string.Create(CultureInfo.InvariantCulture, $"{Scope.Length}:{Scope}:{Key}");

    /// <inheritdoc/>
    public override string ToString() => ToGrainKey();
}

/// <summary>Finds the grain of an <see cref="IdempotencyKey"/>.</summary>
public static class IdempotencyGrainFactoryExtensions
{
    /// <summary>The grain that owns <paramref name="key"/>.</summary>
    public static IIdempotencyGrain GetIdempotencyGrain(this IGrainFactory grains, IdempotencyKey key) =>
        grains.GetGrain<IIdempotencyGrain>(key.ToGrainKey());
}
