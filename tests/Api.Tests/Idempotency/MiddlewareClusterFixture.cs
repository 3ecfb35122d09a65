using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Time.Testing;
using Orleans.Storage;
using Orleans.TestingHost;
using OrleansIdempotency.Grains;

namespace OrleansIdempotency.AspNetCore.Tests;

/// <summary>
/// An in-process cluster for middleware tests: in-memory records behind a switch that takes the store "down", and a
/// fake clock shared by the grains and the middleware.
/// </summary>
public sealed class MiddlewareClusterFixture : IAsyncLifetime
{
    public FakeTimeProvider Time { get; } = new(new DateTimeOffset(2026, 1, 1, 0, 0, 0, TimeSpan.Zero));

    public SwitchableStorage.Switch Store { get; } = new();

    public InProcessTestCluster Cluster { get; private set; } = null!;

    public IGrainFactory Grains => Cluster.Client;

    /// <summary>Runs <paramref name="action"/> with the store down, and brings it back up whatever happens.</summary>
    public async Task<T> WhileStoreDownAsync<T>(Func<Task<T>> action)
    {
        Store.Down = true;
        try
        {
            return await action();
        }
        finally
        {
            Store.Down = false;
        }
    }

    public async Task InitializeAsync()
    {
        var builder = new InProcessTestClusterBuilder(initialSilosCount: 1);
        builder.ConfigureSilo((_, silo) =>
        {
            silo.AddMemoryGrainStorage("memory");
            silo.Services.AddKeyedSingleton<IGrainStorage>(IdempotencyGrain.StorageName,
                (sp, _) => new SwitchableStorage(sp.GetRequiredKeyedService<IGrainStorage>("memory"), Store));
            silo.Services.AddSingleton<TimeProvider>(Time);
            silo.Services.UseTimeProviderForBackgroundAreas(TimeProvider.System);
        });
        Cluster = builder.Build();
        await Cluster.DeployAsync();
    }

    public async Task DisposeAsync() => await Cluster.DisposeAsync();
}

/// <summary>Grain storage that fails every call while its switch is down, as a database outage does.</summary>
public sealed class SwitchableStorage(IGrainStorage inner, SwitchableStorage.Switch state) : IGrainStorage
{
    public sealed class Switch
    {
        public bool Down { get; set; }

        private TaskCompletionSource<Func<Task>>? lostWrite;
        private int writes;

        /// <summary>Runs before each write reaches the store, while set: a slow write, say.</summary>
        public Func<Task>? BeforeWrite { get; set; }

        /// <summary>The writes the store has taken.</summary>
        public int Writes => Volatile.Read(ref writes);

        /// <summary>
        /// The next write fails as the store goes down, though it was sent: the task gives the function that lands it
        /// later, as it was sent (a write queued behind a partition, or retransmitted once it heals).
        /// </summary>
        public Task<Func<Task>> LoseNextWriteInAnOutage()
        {
            lostWrite = new TaskCompletionSource<Func<Task>>(TaskCreationOptions.RunContinuationsAsynchronously);
            return lostWrite.Task;
        }

        internal bool TryLose(Func<Task> land)
        {
            if (Interlocked.Exchange(ref lostWrite, null) is not { } lost)
            {
                return false;
            }

            Down = true;
            lost.SetResult(land);
            return true;
        }

        internal void Wrote() => Interlocked.Increment(ref writes);
    }

    public Task ReadStateAsync<T>(string stateName, GrainId grainId, IGrainState<T> grainState) =>
        state.Down ? Unavailable() : inner.ReadStateAsync(stateName, grainId, grainState);

    public async Task WriteStateAsync<T>(string stateName, GrainId grainId, IGrainState<T> grainState)
    {
        if (state.BeforeWrite is { } before)
        {
            await before();
        }

        var sent = new GrainState<T>(grainState.State) { ETag = grainState.ETag, RecordExists = grainState.RecordExists };
        if (state.TryLose(() => inner.WriteStateAsync(stateName, grainId, sent)))
        {
            await Unavailable();
        }

        await (state.Down ? Unavailable() : inner.WriteStateAsync(stateName, grainId, grainState));
        state.Wrote();
    }

    public Task ClearStateAsync<T>(string stateName, GrainId grainId, IGrainState<T> grainState) =>
        state.Down ? Unavailable() : inner.ClearStateAsync(stateName, grainId, grainState);

    private static Task Unavailable() => Task.FromException(new IOException("The store is down (test switch)."));
}

[CollectionDefinition(Name)]
public sealed class MiddlewareClusterCollection : ICollectionFixture<MiddlewareClusterFixture>
{
    public const string Name = "middleware-cluster";
}
