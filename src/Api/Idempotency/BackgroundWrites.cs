using Orleans.Runtime;
using OrleansIdempotency.Grains;

namespace OrleansIdempotency.AspNetCore;

/// <summary>
/// The writes a request could not get through to the store (a claim's release, an action's completion), retried in
/// the background until each lands or its time is up. While the store stays down one write is tried at a time, about
/// once a second, however many wait: an outage at R requests a second, each leaving a release behind, costs the
/// store and the cluster one call a second, not R times the lease's retries. Once one lands, the rest follow in
/// batches. Completions go first: each must land before its lease ends, when the store would refuse it; a release
/// can wait for as long as its key is kept.
/// </summary>
internal sealed partial class BackgroundWrites(TimeProvider time, ILogger logger)
{
    /// <summary>The most writes that wait (about 200 bytes each); beyond it a write is given up at once.</summary>
    public const int MaxWaiting = 100_000;

    private const int BatchSize = 32;

    private readonly Lock gate = new();
    private readonly Queue<Write> completions = new();
    private readonly Queue<Write> releases = new();
    private bool draining;

    /// <summary>How many writes wait for the store.</summary>
    public int Waiting
    {
        get
        {
            lock (gate)
            {
                return completions.Count + releases.Count;
            }
        }
    }

    /// <summary>Retries <paramref name="call"/>, which completes an action, until it lands or <paramref name="giveUpAt"/>.</summary>
    public void AddCompletion(IIdempotencyGrain grain, Func<IIdempotencyGrain, Task<bool>> call, DateTimeOffset giveUpAt) =>
        Add(new Write(grain, call, giveUpAt, IsCompletion: true));

    /// <summary>Retries <paramref name="call"/>, which releases a claim, until it lands or <paramref name="giveUpAt"/>.</summary>
    public void AddRelease(IIdempotencyGrain grain, Func<IIdempotencyGrain, Task<bool>> call, DateTimeOffset giveUpAt) =>
        Add(new Write(grain, call, giveUpAt, IsCompletion: false));

    private void Add(Write write)
    {
        bool start;
        lock (gate)
        {
            if (completions.Count + releases.Count >= MaxWaiting)
            {
                LogTooManyWaiting(logger, write.Key, MaxWaiting);
                return;
            }

            QueueOf(write).Enqueue(write);
            start = !draining;
            draining = true;
        }

        if (start)
        {
            _ = Task.Run(DrainAsync);
        }
    }

    private async Task DrainAsync()
    {
        // A failure turns the batch into a probe of one, which rotates through the writes: one that fails for a
        // reason of its own does not hold back the others once the store is back.
        var failures = 0;
        while (Take(failures == 0 ? BatchSize : 1) is { Count: > 0 } batch)
        {
            var landed = await Task.WhenAll(batch.Select(TryAsync));
            var failed = 0;
            lock (gate)
            {
                for (var i = 0; i < batch.Count; i++)
                {
                    if (!landed[i])
                    {
                        QueueOf(batch[i]).Enqueue(batch[i]);
                        failed++;
                    }
                }
            }

            failures = failed == 0 ? 0 : failures + 1;
            if (failed > 0)
            {
                await Task.Delay(IdempotencyGrainCalls.Backoff(failures), time);
            }
        }
    }

    // Up to count writes, completions first, leaving out those whose time is up; none ends the drain.
    private List<Write> Take(int count)
    {
        var now = time.GetUtcNow();
        var batch = new List<Write>(count);
        lock (gate)
        {
            while (batch.Count < count && (completions.TryDequeue(out var write) || releases.TryDequeue(out write)))
            {
                if (now < write.GiveUpAt)
                {
                    batch.Add(write);
                }
                else if (write.IsCompletion)
                {
                    LogLeaseEnded(logger, write.Key);
                }
                else
                {
                    LogRetentionEnded(logger, write.Key);
                }
            }

            draining = batch.Count > 0;
        }

        return batch;
    }

    private async Task<bool> TryAsync(Write write)
    {
        try
        {
            // Refused (a stale completion, a release of a claim no longer held) is an answer too: done.
            await write.Call(write.Grain);
            return true;
        }
        catch (Exception ex) when (ex is not OutOfMemoryException)
        {
            LogStillFailing(logger, write.Key, ex.GetType().Name);
            return false;
        }
    }

    private Queue<Write> QueueOf(Write write) => write.IsCompletion ? completions : releases;

    private sealed record Write(IIdempotencyGrain Grain, Func<IIdempotencyGrain, Task<bool>> Call, DateTimeOffset GiveUpAt, bool IsCompletion)
    {
        public string Key => Grain.GetPrimaryKeyString();
    }

    [LoggerMessage(Level = LogLevel.Warning, Message = "Idempotency key {Key}: a background write failed ({Reason}); it waits for the store.")]
    private static partial void LogStillFailing(ILogger logger, string key, string reason);

    [LoggerMessage(Level = LogLevel.Error, Message = "Idempotency key {Key}: {MaxWaiting} writes already wait for the store; this one is given up, and the claim it was to end lapses into an unknown outcome.")]
    private static partial void LogTooManyWaiting(ILogger logger, string key, int maxWaiting);

    [LoggerMessage(Level = LogLevel.Error, Message = "Idempotency key {Key}: the store stayed unreachable for the whole lease; the claim lapses and its outcome becomes unknown.")]
    private static partial void LogLeaseEnded(ILogger logger, string key);

    [LoggerMessage(Level = LogLevel.Warning, Message = "Idempotency key {Key}: the store stayed unreachable until the key's retention ended; its release is given up, as the key is forgotten.")]
    private static partial void LogRetentionEnded(ILogger logger, string key);
}
