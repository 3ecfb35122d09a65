using Microsoft.Extensions.DependencyInjection;
using Orleans.Serialization;
using OrleansIdempotency.Grains;
using OrleansIdempotency.Silo.Storage;

namespace OrleansIdempotency.Silo.Tests;

/// <summary>The storage serializer as the silo builds it, for tests without a silo.</summary>
internal static class TestSerializer
{
    public static IdempotencyStorageSerializer Storage { get; } = new(new ServiceCollection()
        .AddSerializer(builder => builder.AddAssembly(typeof(IdempotencyRecord).Assembly))
        .BuildServiceProvider()
        .GetRequiredService<Serializer>());
}
