using Npgsql;
using OrleansIdempotency.Api.Demo;
using OrleansIdempotency.AspNetCore;
using OrleansIdempotency.AspNetCore.Tests;
using OrleansIdempotency.Grains;

namespace OrleansIdempotency.Api.Tests.Demo;

/// <summary>The demo's policy: a write whose connection broke after it was sent keeps its key; one refused is retried.</summary>
[Collection(MiddlewareClusterCollection.Name)]
public sealed class DemoIdempotencyTests(MiddlewareClusterFixture fixture)
{
    private static readonly IdempotencyPolicy Policy = IdempotencyPolicy.Default.KeepingUnknownWritesInDoubt();

    [Fact]
    public async Task WriteOfUnknownOutcome_KeepsItsKeyInDoubt_SoTheRetryDoesNotWriteAgain()
    {
        var harness = new MiddlewareHarness(fixture, _ =>
            throw new DemoWriteInDoubtException(new NpgsqlException("Exception while reading from stream", new IOException())), Policy);
        var key = MiddlewareHarness.NewKey();

        await Assert.ThrowsAsync<DemoWriteInDoubtException>(() => harness.SendAsync(key));

        await harness.AssertLeftInDoubtAsync(key);
    }

    [Fact]
    public async Task WriteTheDatabaseRefused_ReleasesItsKey_ForTheRetry()
    {
        var harness = new MiddlewareHarness(fixture, _ =>
            throw new PostgresException("terminating", "FATAL", "FATAL", PostgresErrorCodes.AdminShutdown), Policy);
        var key = MiddlewareHarness.NewKey();

        await Assert.ThrowsAsync<PostgresException>(() => harness.SendAsync(key));

        Assert.Equal(IdempotencyStatus.None, (await harness.Grain(key).GetAsync()).Status);
    }
}
