using Microsoft.Extensions.DependencyInjection;
using Orleans.Storage;
using OrleansIdempotency.Grains;
using OrleansIdempotency.Silo.Storage;

namespace OrleansIdempotency.Silo.Tests;

public sealed class IdempotencySiloBuilderExtensionsTests
{
    private static ClaimRequest Claim() => new(Guid.NewGuid(), [4, 2], TimeSpan.FromMinutes(1), TimeSpan.FromHours(1));

    [Fact]
    public async Task EmbeddedDefault_KeepsRecordsInThisSilosMemory_AndReplaysThemAfterDeactivation()
    {
        var created = new StoredResponse(201, [new("Location", "/orders/7")], "{\"id\":7}"u8.ToArray(), false, 8);
        await using var silo = await TestSilo.StartAsync(new Dictionary<string, string?>());
        Assert.IsType<InMemoryRecordStorage>(silo.Host.Services.GetRequiredKeyedService<IGrainStorage>(IdempotencyGrain.StorageName));

        var grain = silo.Grains.GetIdempotencyGrain(new IdempotencyKey("alice", Guid.NewGuid().ToString("N")));
        var claim = await grain.ClaimAsync(Claim());
        Assert.True(await grain.CompleteAsync(claim.Token!.Value, created));
        var management = silo.Grains.GetGrain<IManagementGrain>(0);
        await management.ForceActivationCollection(TimeSpan.Zero);
        Assert.Equal(0, await management.GetGrainActivationCount((GrainReference)grain));

        var replay = await grain.ClaimAsync(Claim());

        Assert.Equal(ClaimOutcome.Completed, replay.Outcome);
        Assert.Equal(created.Body, replay.Response!.Body);
        Assert.Equal(created.Headers, replay.Response.Headers);
    }

    [Fact]
    public async Task ClusterWithoutPostgres_IsRefused_AtStart()
    {
        var error = await Assert.ThrowsAsync<InvalidOperationException>(() => TestSilo.StartAsync(new Dictionary<string, string?>
        {
            ["ConnectionStrings:Redis"] = "127.0.0.1:1",
        }));

        Assert.Contains("ConnectionStrings:Postgres", error.Message, StringComparison.Ordinal);
    }
}
