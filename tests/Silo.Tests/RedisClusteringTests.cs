using OrleansIdempotency.Testing;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Testing;
using Microsoft.Extensions.Options;
using Orleans.Configuration;
using OrleansIdempotency.Grains;
using OrleansIdempotency.Silo.Hosting;

namespace OrleansIdempotency.Silo.Tests;

[Collection(ServersCollection.Name)]
public sealed class RedisClusteringTests(ServersFixture servers)
{
    private static readonly StoredResponse Ok = new(200, [], "ok"u8.ToArray(), false, 2);

    [Fact]
    public async Task TwoSilos_FormOneClusterThroughRedis_AndEveryKeyIsReachableFromBoth()
    {
        var settings = await TestClusterSettings.CreateAsync(servers);
        await using var first = await TestSilo.StartAsync(settings);
        await using var second = await TestSilo.StartAsync(settings);
        await WaitForActiveSilosAsync(first.Grains, 2);

        for (var i = 0; i < 20; i++)
        {
            var key = new IdempotencyKey("tenant", $"k{i}-{Guid.NewGuid():N}");
            var claim = await first.Grains.GetIdempotencyGrain(key).ClaimAsync(Claim());
            Assert.True(await second.Grains.GetIdempotencyGrain(key).CompleteAsync(claim.Token!.Value, Ok));
            Assert.Equal(ClaimOutcome.Completed, (await first.Grains.GetIdempotencyGrain(key).ClaimAsync(Claim())).Outcome);
        }

        Assert.Equal(2, (await second.Grains.GetGrain<IManagementGrain>(0).GetHosts(onlyActive: true)).Count);
    }

    [Fact]
    public async Task SiloStartedWhileRedisIsDown_WaitsForIt_AndJoins()
    {
        // Orleans reads the membership table once at start: without a wait the start failed ~10 s in.
        var settings = await TestClusterSettings.CreateAsync(servers);
        using var logs = new FakeLoggerProvider();
        await servers.Redis.StopAsync();
        Task<TestSilo> starting;
        try
        {
            starting = TestSilo.StartAsync(settings, silo => silo.Services.AddSingleton<ILoggerProvider>(logs));
            await Task.Delay(TimeSpan.FromSeconds(15));
            Assert.False(starting.IsCompleted, "The silo's start ended while Redis was down.");
        }
        finally
        {
            await servers.Redis.StartAgainAsync();
        }

        await using var started = await starting.WaitAsync(TimeSpan.FromSeconds(60));
        await WaitForActiveSilosAsync(started.Grains, 1);
        Assert.Contains(logs.Collector.GetSnapshot(), r => r.Level == LogLevel.Warning && r.Message.Contains("Redis", StringComparison.Ordinal)
            && r.Message.Contains("not reachable yet", StringComparison.Ordinal));
    }

    [Theory]
    [InlineData(null, true)]
    [InlineData("127.0.0.1", false)]
    public async Task SiloOnRedis_WithoutAnAdvertisedHost_WarnsAtStartThatItAdvertisesLoopback_ButNotWhenOneIsSet(string? advertisedHost, bool warns)
    {
        // Silos on two hosts both advertising the default would each take the other for its own earlier run.
        var settings = await TestClusterSettings.CreateAsync(servers);
        settings["Orleans:Endpoints:AdvertisedHost"] = advertisedHost;
        using var logs = new FakeLoggerProvider();

        await using var silo = await TestSilo.StartAsync(settings, s => s.Services.AddSingleton<ILoggerProvider>(logs));

        var warnings = logs.Collector.GetSnapshot()
            .Where(r => r.Level == LogLevel.Warning && r.Message.Contains("Orleans__Endpoints__AdvertisedHost", StringComparison.Ordinal)).ToList();
        Assert.Equal(warns ? 1 : 0, warnings.Count);
        if (warns)
        {
            var port = silo.Host.Services.GetRequiredService<IOptions<EndpointOptions>>().Value.SiloPort;
            Assert.Contains($"127.0.0.1:{port}", warnings[0].Message, StringComparison.Ordinal);
        }
    }

    [Fact]
    public async Task ClientRole_FindsTheClusterThroughRedis_AndCallsItsGrains()
    {
        var settings = await TestClusterSettings.CreateAsync(servers);
        await using var silo = await TestSilo.StartAsync(settings);
        var builder = Host.CreateApplicationBuilder(new HostApplicationBuilderSettings { DisableDefaults = true });
        builder.Configuration.AddInMemoryCollection(settings);
        builder.UseOrleansClient(client => client.UseIdempotency(builder.Configuration));
        using var clientHost = builder.Build();
        await clientHost.StartAsync();

        var grain = clientHost.Services.GetRequiredService<IClusterClient>().GetIdempotencyGrain(new IdempotencyKey("t", Guid.NewGuid().ToString()));
        var claim = await grain.ClaimAsync(Claim());

        Assert.Equal(ClaimOutcome.Acquired, claim.Outcome);
        Assert.True(await silo.Grains.GetIdempotencyGrain(new IdempotencyKey("t", "other")).ClaimAsync(Claim()) is { Outcome: ClaimOutcome.Acquired });
        await clientHost.StopAsync();
    }

    private static ClaimRequest Claim() => new(Guid.NewGuid(), [1], TimeSpan.FromMinutes(1), TimeSpan.FromHours(1));

    internal static async Task WaitForActiveSilosAsync(IGrainFactory grains, int count)
    {
        var management = grains.GetGrain<IManagementGrain>(0);
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(60);
        while ((await management.GetHosts(onlyActive: true)).Count != count)
        {
            Assert.True(DateTime.UtcNow < deadline, $"The cluster did not reach {count} active silos.");
            await Task.Delay(250);
        }
    }
}
