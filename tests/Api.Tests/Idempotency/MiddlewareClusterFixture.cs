using System.Collections.Concurrent;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;
using Microsoft.Extensions.Options;
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

    /// <summary>Options as the layer's tests use them: a short cluster retry budget, so outages answer quickly.</summary>
    public static IOptions<IdempotencyOptions> Options() =>
        Microsoft.Extensions.Options.Options.Create(new IdempotencyOptions { ClusterRetryBudget = TimeSpan.FromSeconds(2) });

    /// <summary>The layer's grain calls on this cluster and its fake clock.</summary>
    internal IdempotencyGrainCalls Calls(IOptions<IdempotencyOptions> options, ILogger<IdempotencyGrainCalls>? logger = null) =>
        new(Grains, options, Time, logger ?? NullLogger<IdempotencyGrainCalls>.Instance);

    /// <summary>
    /// Writes what another activation of <paramref name="grain"/>'s key would (while membership changes): the release
    /// of <paramref name="holder"/>'s claim, then <paramref name="request"/>'s claim. The key's own activation, if any,
    /// still has the holder's claim in its copy.
    /// </summary>
    public async Task ReleaseAndClaimElsewhereAsync(IIdempotencyGrain grain, Guid holder, ClaimRequest request)
    {
        var storage = Cluster.Silos[0].ServiceProvider.GetRequiredKeyedService<IGrainStorage>(IdempotencyGrain.StorageName);
        var state = new GrainState<IdempotencyRecord>();
        await storage.ReadStateAsync(IdempotencyGrain.StateName, grain.GetGrainId(), state);
        state.State = IdempotencyTransitions.Release(state.State!, holder, IdempotencyPolicy.Default.Lease, Time.GetUtcNow()).Next!;
        state.State = IdempotencyTransitions.Claim(state.State, request, Time.GetUtcNow()).Next!;
        await storage.WriteStateAsync(IdempotencyGrain.StateName, grain.GetGrainId(), state);
    }

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

    /// <inheritdoc cref="ClockRunsUntilAsync(Func{Task{bool}})"/>
    public Task ClockRunsUntilAsync(Func<bool> condition) => ClockRunsUntilAsync(() => Task.FromResult(condition()));

    /// <summary>
    /// Moves the fake clock on 200 ms at a time until <paramref name="condition"/> holds (for at most 10 s of real
    /// time): a timer rescheduled just after a test moved the clock in one jump would wait for a clock that no longer
    /// moves.
    /// </summary>
    public Task ClockRunsUntilAsync(Func<Task<bool>> condition) => MiddlewareHarness.WaitUntilAsync(async () =>
    {
        Time.Advance(TimeSpan.FromMilliseconds(200));
        return await condition();
    });

    /// <summary>Moves the fake clock on by <paramref name="span"/> in steps, giving background retries real time to run at each.</summary>
    public async Task RunClockAsync(TimeSpan span)
    {
        for (var run = TimeSpan.Zero; run < span; run += TimeSpan.FromMilliseconds(250))
        {
            Time.Advance(TimeSpan.FromMilliseconds(250));
            await Task.Delay(10);
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
            silo.AddIncomingGrainCallFilter(new ClaimsElsewhere(Store));
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

        /// <summary>What a call fails with while the store is down: an I/O error unless a test says otherwise.</summary>
        public Func<Exception> Failure { get; set; } = () => new IOException("The store is down (test switch).");

        // Per key: a test's hook must not be taken by another test's key (background releases write at any time).
        private readonly ConcurrentDictionary<GrainId, Func<Task>> beforeNextWrite = new();
        private readonly ConcurrentDictionary<GrainId, TaskCompletionSource<Func<Task>>> lostWrites = new();
        private readonly ConcurrentDictionary<GrainId, int> writes = new();
        private readonly ConcurrentDictionary<GrainId, int> refused = new();
        private readonly ConcurrentDictionary<GrainId, bool> answersLost = new();
        private readonly ConcurrentDictionary<GrainId, (Func<ClaimRequest, Task>? Elsewhere, int Lost)> claimsElsewhere = new();

        /// <summary>
        /// The next claim of <paramref name="grain"/> is taken elsewhere (another activation of the key, while
        /// membership changes): <paramref name="elsewhere"/> writes it to the store, and its answer is lost on its
        /// way, as are the answers of the <paramref name="lostTries"/> - 1 tries after it, which reach no activation.
        /// </summary>
        public void ClaimNextElsewhere(GrainId grain, Func<ClaimRequest, Task> elsewhere, int lostTries = 1) => claimsElsewhere[grain] = (elsewhere, lostTries);

        /// <returns>Whether this claim's answer is lost, with what to write first (for the first of them).</returns>
        internal bool TryClaimElsewhere(GrainId grain, out Func<ClaimRequest, Task>? elsewhere)
        {
            elsewhere = null;
            if (!claimsElsewhere.TryRemove(grain, out var next))
            {
                return false;
            }

            if (next.Lost > 1)
            {
                claimsElsewhere[grain] = (null, next.Lost - 1);
            }

            elsewhere = next.Elsewhere;
            return true;
        }

        /// <summary>Runs <paramref name="action"/> before the next write of <paramref name="grain"/> reaches the store: a slow write, say.</summary>
        public void BeforeNextWrite(GrainId grain, Func<Task> action) => beforeNextWrite[grain] = action;

        /// <summary>The writes of <paramref name="grain"/> the store has taken.</summary>
        public int WritesOf(GrainId grain) => writes.GetValueOrDefault(grain);

        /// <summary>The next write of <paramref name="grain"/> lands, but fails to answer, as a connection dropped after the commit does.</summary>
        public void LoseNextAnswer(GrainId grain) => answersLost[grain] = true;

        /// <summary>The reads and writes of <paramref name="grain"/> the store failed while it was down.</summary>
        public int RefusedOf(GrainId grain) => refused.GetValueOrDefault(grain);

        /// <summary>
        /// The next write of <paramref name="grain"/> fails as the store goes down, though it was sent: the task gives
        /// the function that lands it later, as it was sent (a write queued behind a partition, or retransmitted once
        /// it heals).
        /// </summary>
        public Task<Func<Task>> LoseNextWriteInAnOutage(GrainId grain) =>
            lostWrites.GetOrAdd(grain, _ => new TaskCompletionSource<Func<Task>>(TaskCreationOptions.RunContinuationsAsynchronously)).Task;

        internal Task BeforeWriteAsync(GrainId grain) => beforeNextWrite.TryRemove(grain, out var action) ? action() : Task.CompletedTask;

        internal bool TryLose(GrainId grain, Func<Task> land)
        {
            if (!lostWrites.TryRemove(grain, out var lost))
            {
                return false;
            }

            Down = true;
            lost.SetResult(land);
            return true;
        }

        internal void Wrote(GrainId grain) => writes.AddOrUpdate(grain, 1, (_, n) => n + 1);

        internal bool TryLoseAnswer(GrainId grain) => answersLost.TryRemove(grain, out _);

        internal Task Refuse(GrainId grain)
        {
            refused.AddOrUpdate(grain, 1, (_, n) => n + 1);
            return Task.FromException(Failure());
        }
    }

    public Task ReadStateAsync<T>(string stateName, GrainId grainId, IGrainState<T> grainState) =>
        state.Down ? state.Refuse(grainId) : inner.ReadStateAsync(stateName, grainId, grainState);

    public async Task WriteStateAsync<T>(string stateName, GrainId grainId, IGrainState<T> grainState)
    {
        await state.BeforeWriteAsync(grainId);
        var sent = new GrainState<T>(grainState.State) { ETag = grainState.ETag, RecordExists = grainState.RecordExists };
        if (state.TryLose(grainId, () => inner.WriteStateAsync(stateName, grainId, sent)))
        {
            await Unavailable();
        }

        await (state.Down ? state.Refuse(grainId) : inner.WriteStateAsync(stateName, grainId, grainState));
        state.Wrote(grainId);
        if (state.TryLoseAnswer(grainId))
        {
            await Unavailable();
        }
    }

    public Task ClearStateAsync<T>(string stateName, GrainId grainId, IGrainState<T> grainState) =>
        state.Down ? Unavailable() : inner.ClearStateAsync(stateName, grainId, grainState);

    private static Task Unavailable() => Task.FromException(new IOException("The store is down (test switch)."));
}

/// <summary>Takes the claims <see cref="SwitchableStorage.Switch.ClaimNextElsewhere"/> names away from their activation.</summary>
internal sealed class ClaimsElsewhere(SwitchableStorage.Switch state) : IIncomingGrainCallFilter
{
    public async Task Invoke(IIncomingGrainCallContext context)
    {
        if (context.InterfaceMethod?.Name == nameof(IIdempotencyGrain.ClaimAsync) && state.TryClaimElsewhere(context.TargetId, out var elsewhere))
        {
            if (elsewhere is not null)
            {
                await elsewhere((ClaimRequest)context.Request.GetArgument(0)!);
            }

            throw new IOException("The claim's answer was lost (test filter).");
        }

        await context.Invoke();
    }
}

[CollectionDefinition(Name)]
public sealed class MiddlewareClusterCollection : ICollectionFixture<MiddlewareClusterFixture>
{
    public const string Name = "middleware-cluster";
}
