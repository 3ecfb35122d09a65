using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Options;
using Orleans.Configuration;
using OrleansIdempotency.Grains;
using OrleansIdempotency.Silo.Storage;

namespace OrleansIdempotency.Silo.Tests;

public sealed class IdempotencySiloBuilderExtensionsTests
{
    [Fact]
    public async Task EmbeddedDefault_StoresRecordsInOrleansBinary_AndReplaysThemAfterDeactivation()
    {
        var created = new StoredResponse(201, [new("Location", "/orders/7")], "{\"id\":7}"u8.ToArray(), false, 8);
        await using var silo = await TestSilo.StartAsync(new Dictionary<string, string?>());
        var options = silo.Host.Services.GetRequiredService<IOptionsMonitor<MemoryGrainStorageOptions>>().Get(IdempotencyGrain.StorageName);
        Assert.IsType<IdempotencyStorageSerializer>(options.GrainStorageSerializer);

        var grain = silo.Grains.GetIdempotencyGrain(new IdempotencyKey("alice", Guid.NewGuid().ToString("N")));
        var claim = await grain.ClaimAsync(new ClaimRequest(Guid.NewGuid(), [4, 2], TimeSpan.FromMinutes(1), TimeSpan.FromHours(1)));
        Assert.True(await grain.CompleteAsync(claim.Token!.Value, created));
        var management = silo.Grains.GetGrain<IManagementGrain>(0);
        await management.ForceActivationCollection(TimeSpan.Zero);
        Assert.Equal(0, await management.GetGrainActivationCount((GrainReference)grain));

        var replay = await grain.ClaimAsync(new ClaimRequest(Guid.NewGuid(), [4, 2], TimeSpan.FromMinutes(1), TimeSpan.FromHours(1)));

        Assert.Equal(ClaimOutcome.Completed, replay.Outcome);
        Assert.Equal(created.Body, replay.Response!.Body);
        Assert.Equal(created.Headers, replay.Response.Headers);
    }
}
