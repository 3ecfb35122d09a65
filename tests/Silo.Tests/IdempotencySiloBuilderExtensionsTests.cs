using System.Diagnostics.Metrics;
using System.Net;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Testing;
using Microsoft.Extensions.Options;
using Orleans.Configuration;
using Orleans.Storage;
using OrleansIdempotency.Grains;
using OrleansIdempotency.Silo.Hosting;
using OrleansIdempotency.Silo.Storage;
using OrleansIdempotency.Testing;

namespace OrleansIdempotency.Silo.Tests;

[Collection(ServersCollection.Name)]
public sealed class IdempotencySiloBuilderExtensionsTests(ServersFixture servers)
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
    public async Task DirectoryCache_HoldsNoMoreThanItsBound_HoweverManyKeysWereCompleted()
    {
        const int bound = 40;
        await using var silo = await TestSilo.StartAsync(new Dictionary<string, string?>
        {
            ["Orleans:DirectoryCacheSize"] = bound.ToString(System.Globalization.CultureInfo.InvariantCulture),
        });
        var response = new StoredResponse(200, [], [], false, 0);

        await Parallel.ForEachAsync(Enumerable.Range(0, 10 * bound), new ParallelOptions { MaxDegreeOfParallelism = 16 }, async (i, _) =>
        {
            var grain = silo.Grains.GetIdempotencyGrain(new IdempotencyKey("alice", $"cache-{i}"));
            var claim = await grain.ClaimAsync(Claim());
            Assert.True(await grain.CompleteAsync(claim.Token!.Value, response));
        });

        // Orleans' LRU cache trims after an add, so concurrent adds may overshoot it for a moment; unbounded it held 400.
        var cached = CachedGrainLocations(silo);
        Assert.InRange(cached, 1, bound + 16);
    }

    [Theory]
    [InlineData("0")]
    [InlineData("2")]
    [InlineData("-1")]
    public async Task DirectoryCacheSize_BelowOrleansSmallestCache_IsRefusedAtStart_NamingTheSetting(string size)
    {
        var error = await Assert.ThrowsAsync<InvalidOperationException>(() => TestSilo.StartAsync(new Dictionary<string, string?>
        {
            ["Orleans:DirectoryCacheSize"] = size,
        }));

        Assert.Contains("Orleans:DirectoryCacheSize", error.Message, StringComparison.Ordinal);
    }

    [Theory]
    [InlineData("120")]
    [InlineData("soon")]
    [InlineData("-00:01:00")]
    public async Task IdempotencyGrainAge_NotAPositiveDurationAsHoursMinutesSeconds_IsRefusedAtStart_NamingTheSetting(string age)
    {
        var error = await Assert.ThrowsAsync<InvalidOperationException>(() => TestSilo.StartAsync(new Dictionary<string, string?>
        {
            ["Orleans:Collection:IdempotencyGrainAge"] = age,
        }));

        Assert.Contains("IdempotencyGrainAge", error.Message, StringComparison.Ordinal);
    }

    [Theory]
    [InlineData("00:00:30", null)]
    [InlineData(null, "00:03:00")]
    public async Task IdempotencyGrainAge_WithinOrleansCollectionQuantum_IsRefusedAtStart_NamingBothSettings(string? age, string? quantum)
    {
        var error = await Assert.ThrowsAsync<InvalidOperationException>(() => TestSilo.StartAsync(new Dictionary<string, string?>
        {
            ["Orleans:Collection:IdempotencyGrainAge"] = age,
            ["Orleans:Collection:CollectionQuantum"] = quantum,
        }));

        Assert.Contains("IdempotencyGrainAge", error.Message, StringComparison.Ordinal);
        Assert.Contains("CollectionQuantum", error.Message, StringComparison.Ordinal);
    }

    [Theory]
    [InlineData("127.0.0.1", true)]
    [InlineData("localhost", true)]
    [InlineData("10.1.2.3", false)]
    public void AdvertisedHost_ListensOnLoopbackAlone_WhenItIsOrResolvesToALoopbackAddress(string host, bool loopback)
    {
        // "localhost" was judged by its text: the silo listened on every address while it advertised 127.0.0.1.
        using var built = Built(new Dictionary<string, string?>
        {
            ["ConnectionStrings:Redis"] = "127.0.0.1:1",
            ["ConnectionStrings:Postgres"] = "Host=127.0.0.1;Port=1",
            ["Orleans:Endpoints:AdvertisedHost"] = host,
        });
        var endpoints = built.Services.GetRequiredService<IOptions<EndpointOptions>>().Value;

        Assert.Equal(loopback, IPAddress.IsLoopback(endpoints.AdvertisedIPAddress));
        Assert.Equal(loopback, endpoints.SiloListeningEndpoint is null || IPAddress.IsLoopback(endpoints.SiloListeningEndpoint.Address));
        Assert.Equal(loopback, endpoints.GatewayListeningEndpoint is null || IPAddress.IsLoopback(endpoints.GatewayListeningEndpoint.Address));
    }

    [Fact]
    public void AdvertisedHostThatDoesNotResolve_IsRefused_NamingTheSetting()
    {
        var error = Assert.Throws<InvalidOperationException>(() => Built(new Dictionary<string, string?>
        {
            ["ConnectionStrings:Redis"] = "127.0.0.1:1",
            ["ConnectionStrings:Postgres"] = "Host=127.0.0.1;Port=1",
            ["Orleans:Endpoints:AdvertisedHost"] = "no-such-host.invalid",
        }));

        Assert.Contains("Orleans:Endpoints:AdvertisedHost", error.Message, StringComparison.Ordinal);
    }

    // A silo host built, not started, from these settings.
    private static IHost Built(Dictionary<string, string?> settings)
    {
        var builder = Host.CreateApplicationBuilder(new HostApplicationBuilderSettings { DisableDefaults = true });
        builder.Configuration.AddInMemoryCollection(settings);
        builder.UseOrleans(silo => silo.UseIdempotency(builder.Configuration));
        return builder.Build();
    }

    [Fact]
    public async Task DirectoryCache_IsBoundedByDefault_FarBelowOrleansMillion()
    {
        await using var silo = await TestSilo.StartAsync(new Dictionary<string, string?>());

        var options = silo.Host.Services.GetRequiredService<IOptions<GrainDirectoryOptions>>().Value;

        Assert.Equal(100_000, options.CacheSize);
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

    [Fact]
    public async Task InMemoryRecordsOutsideDevelopment_WithoutTheSettingThatAllowsThem_AreRefusedAtStart()
    {
        // A production host whose ConnectionStrings__Postgres did not arrive.
        var error = await Assert.ThrowsAsync<InvalidOperationException>(() => TestSilo.StartAsync(new Dictionary<string, string?>
        {
            ["Orleans:AllowInMemoryRecords"] = "false",
        }));

        Assert.Contains("ConnectionStrings__Postgres", error.Message, StringComparison.Ordinal);
        Assert.Contains("Orleans__AllowInMemoryRecords=true", error.Message, StringComparison.Ordinal);
        Assert.Contains("Production", error.Message, StringComparison.Ordinal);
    }

    [Fact]
    public async Task InMemoryRecordsWhereAllowed_StartWithAWarningThatKeysDoNotSurviveARestart()
    {
        using var log = new FakeLoggerProvider();

        await using var silo = await TestSilo.StartAsync(
            new Dictionary<string, string?>(), configure: builder => builder.Services.AddSingleton<ILoggerProvider>(log));

        var warning = Assert.Single(InMemoryWarnings(log));
        Assert.Contains("do not survive a restart", warning.Message, StringComparison.Ordinal);
        Assert.Contains("ConnectionStrings__Postgres", warning.Message, StringComparison.Ordinal);
    }

    [Fact]
    public async Task HostAddingPostgresItself_OutsideDevelopment_StartsWithoutTheSettingForInMemoryRecords_OrTheirWarning()
    {
        var connectionString = await servers.Postgres.CreateDatabaseAsync();
        using var log = new FakeLoggerProvider();

        await using var silo = await TestSilo.StartAsync(
            new Dictionary<string, string?> { ["Orleans:AllowInMemoryRecords"] = "false" },
            configure: builder =>
            {
                builder.AddIdempotencyPostgresStorage(connectionString);
                builder.Services.AddSingleton<ILoggerProvider>(log);
            });

        Assert.IsNotType<InMemoryRecordStorage>(silo.Host.Services.GetRequiredKeyedService<IGrainStorage>(IdempotencyGrain.StorageName));
        Assert.Empty(InMemoryWarnings(log));
    }

    private static IEnumerable<FakeLogRecord> InMemoryWarnings(FakeLoggerProvider log) =>
        log.Collector.GetSnapshot().Where(r => r.Category == typeof(InMemoryStorageCheck).FullName && r.Level == LogLevel.Warning);

    /// <summary>
    /// The entries in this silo's grain-directory cache, as Orleans reports them (the <c>orleans-directory-cache-size</c>
    /// gauge of the meters this silo created; other silos in this test process have meters of their own).
    /// </summary>
    private static long CachedGrainLocations(TestSilo silo)
    {
        var meters = silo.Host.Services.GetRequiredService<IMeterFactory>();
        long? size = null;
        using var listener = new MeterListener();
        listener.InstrumentPublished = (instrument, l) =>
        {
            if (instrument.Name == "orleans-directory-cache-size" && ReferenceEquals(instrument.Meter.Scope, meters))
            {
                l.EnableMeasurementEvents(instrument);
            }
        };
        listener.SetMeasurementEventCallback<int>((_, value, _, _) => size = (size ?? 0) + value);
        listener.SetMeasurementEventCallback<long>((_, value, _, _) => size = (size ?? 0) + value);
        listener.Start();
        listener.RecordObservableInstruments();
        return size ?? throw new InvalidOperationException("This silo published no orleans-directory-cache-size gauge.");
    }
}
