using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Testing;
using Microsoft.Extensions.Time.Testing;
using Orleans.Storage;
using Orleans.TestingHost;

namespace OrleansIdempotency.Grains.Tests;

/// <summary>A two-silo in-process cluster with in-memory storage, whose grains read a shared fake clock.</summary>
public sealed class ClusterFixture : IAsyncLifetime
{
    public FakeTimeProvider Time { get; } = new(new DateTimeOffset(2026, 1, 1, 0, 0, 0, TimeSpan.Zero));

    public InProcessTestCluster Cluster { get; private set; } = null!;

    /// <summary>Counts every storage call of both silos' idempotency grains.</summary>
    public StorageCounter Storage { get; } = new();

    public IGrainFactory Grains => Cluster.Client;

    /// <summary>What both silos log.</summary>
    public FakeLoggerProvider Log { get; } = new();

    public async Task InitializeAsync()
    {
        var builder = new InProcessTestClusterBuilder(initialSilosCount: 2);
        builder.ConfigureSilo((_, silo) =>
        {
            silo.AddMemoryGrainStorage("memory");
            silo.Services.AddKeyedSingleton<IGrainStorage>(IdempotencyGrain.StorageName, (services, _) =>
                new CountingStorage(services.GetRequiredKeyedService<IGrainStorage>("memory"), Storage));
            silo.Services.AddSingleton<TimeProvider>(Time);
            silo.Services.AddSingleton<ILoggerProvider>(Log);
            // Membership, messaging and collection keep real time; only the grains see the fake clock.
            silo.Services.UseTimeProviderForBackgroundAreas(TimeProvider.System);
        });
        Cluster = builder.Build();
        await Cluster.DeployAsync();
    }

    public async Task DisposeAsync()
    {
        await Cluster.DisposeAsync();
        Log.Dispose();
    }
}

[CollectionDefinition(Name)]
public sealed class ClusterCollection : ICollectionFixture<ClusterFixture>
{
    public const string Name = "cluster";
}
