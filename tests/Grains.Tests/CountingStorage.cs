using System.Collections.Concurrent;
using Orleans.Storage;

namespace OrleansIdempotency.Grains.Tests;

/// <summary>Per grain: the reads, the writes and the writes storage refused, counted across silos.</summary>
public sealed class StorageCounter
{
    private readonly ConcurrentDictionary<GrainId, StorageCounts> counts = new();

    private readonly ConcurrentDictionary<GrainId, Func<Task>> beforeNextWrite = new();

    public StorageCounts For(GrainId grain) => counts.GetValueOrDefault(grain, new StorageCounts(0, 0, 0));

    /// <summary>Runs <paramref name="action"/> before the next write of <paramref name="grain"/> reaches storage (it may throw instead).</summary>
    public void BeforeNextWrite(GrainId grain, Func<Task> action) => beforeNextWrite[grain] = action;

    private readonly ConcurrentDictionary<GrainId, Func<Task>> beforeNextRead = new();

    /// <summary>Runs <paramref name="action"/> while the next read of <paramref name="grain"/> is under way (a slow read, say).</summary>
    public void DuringNextRead(GrainId grain, Func<Task> action) => beforeNextRead[grain] = action;

    private readonly ConcurrentDictionary<GrainId, TaskCompletionSource<Func<Task>>> lostWrites = new();

    /// <summary>
    /// Fails the next write of <paramref name="grain"/> as a timed-out write fails, though it was sent: the task gives
    /// the function that lands it later, as it was sent (the caller decides when).
    /// </summary>
    public Task<Func<Task>> LoseNextWrite(GrainId grain) =>
        lostWrites.GetOrAdd(grain, _ => new TaskCompletionSource<Func<Task>>(TaskCreationOptions.RunContinuationsAsynchronously)).Task;

    internal bool TryLoseWrite(GrainId grain, Func<Task> land)
    {
        if (!lostWrites.TryRemove(grain, out var lost))
        {
            return false;
        }

        lost.SetResult(land);
        return true;
    }

    internal Task DuringReadAsync(GrainId grain) => beforeNextRead.TryRemove(grain, out var action) ? action() : Task.CompletedTask;

    internal Task BeforeWriteAsync(GrainId grain) => beforeNextWrite.TryRemove(grain, out var action) ? action() : Task.CompletedTask;

    internal void Add(GrainId grain, StorageCounts delta) => counts.AddOrUpdate(grain, delta,
        (_, c) => new StorageCounts(c.Reads + delta.Reads, c.Writes + delta.Writes, c.Refused + delta.Refused));
}

/// <summary>Grain storage that counts its calls in a <see cref="StorageCounter"/>.</summary>
public sealed class CountingStorage(IGrainStorage inner, StorageCounter counts) : IGrainStorage
{

    public async Task ReadStateAsync<T>(string stateName, GrainId grainId, IGrainState<T> grainState)
    {
        counts.Add(grainId, new StorageCounts(1, 0, 0));
        await counts.DuringReadAsync(grainId);
        await inner.ReadStateAsync(stateName, grainId, grainState);
    }

    public async Task WriteStateAsync<T>(string stateName, GrainId grainId, IGrainState<T> grainState)
    {
        try
        {
            await counts.BeforeWriteAsync(grainId);
            var sent = new GrainState<T>(grainState.State) { ETag = grainState.ETag, RecordExists = grainState.RecordExists };
            if (counts.TryLoseWrite(grainId, () => inner.WriteStateAsync(stateName, grainId, sent)))
            {
                throw new TimeoutException("The write timed out (test): it was sent, and may still land.");
            }

            await inner.WriteStateAsync(stateName, grainId, grainState);
            counts.Add(grainId, new StorageCounts(0, 1, 0));
        }
        catch (InconsistentStateException)
        {
            counts.Add(grainId, new StorageCounts(0, 0, 1));
            throw;
        }
    }

    public Task ClearStateAsync<T>(string stateName, GrainId grainId, IGrainState<T> grainState) =>
        inner.ClearStateAsync(stateName, grainId, grainState);
}

public sealed record StorageCounts(int Reads, int Writes, int Refused);
