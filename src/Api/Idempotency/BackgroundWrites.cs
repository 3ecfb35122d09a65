using OrleansIdempotency.Grains;

namespace OrleansIdempotency.AspNetCore;

/// <summary>
/// The writes a request could not get through to the store (a claim's release, an action's completion), retried in
/// the background until each lands or its time is up. While the store stays down one write is tried at a time, about
/// once a second, however many wait: an outage at R requests a second, each leaving a release behind, costs the
/// store and the cluster one call a second, not R times the lease's retries. Once one lands, the rest follow in
/// batches. Completions go first in a batch: each must land before its lease ends, when the store would refuse it; a
/// release can wait for as long as its key is kept. Probes alternate between the two kinds.
/// </summary>
internal sealed partial class BackgroundWrites(TimeProvider time, ILogger logger) : IDisposable
{
    /// <summary>
    /// The most releases that wait (about 200 bytes each), counting those being tried; beyond it a release is given
    /// up at once.
    /// </summary>
    public const int MaxReleases = 100_000;

    /// <summary>
    /// The most bytes of responses that completions waiting hold, counting those being tried; beyond it a completion
    /// is given up at once. Apart from the releases' bound: an outage's releases never crowd out an action's completion.
    /// </summary>
    public const long MaxCompletionBytes = 256L << 20;

    private const int BatchSize = 32;

    private readonly Lock gate = new();
    private readonly Queue<Write> completions = new();
    private readonly Queue<Write> releases = new();
    private readonly CancellationTokenSource stopped = new();

    // What the bounds count: the writes queued and those out being tried, which a failed try queues again.
    private long completionBytes;
    private int completionsHeld;
    private int releasesHeld;
    private bool draining;
    private bool storeDown;
    private bool probeReleaseFirst;

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

    /// <summary>
    /// How many writes wait for the store, counting those out being tried. Read without the lock: a meter's collection
    /// asks for it, and must not wait on a drain that records to that meter under the lock.
    /// </summary>
    public int Held => Volatile.Read(ref completionsHeld) + Volatile.Read(ref releasesHeld);

    /// <summary>True while every write tried last failed: a write sent now would most likely fail too.</summary>
    public bool StoreSeemsDown => Volatile.Read(ref storeDown);

    /// <summary>
    /// Retries <paramref name="call"/>, which completes an action with a response of <paramref name="bytes"/>, until it
    /// lands or <paramref name="giveUpAt"/>; then <paramref name="settled"/> says, once, whether the store took it.
    /// </summary>
    public void AddCompletion(IIdempotencyGrain grain, Func<IIdempotencyGrain, Task<bool>> call, long bytes, DateTimeOffset giveUpAt, Action<bool>? settled = null) =>
        Add(new Write(grain, call, giveUpAt, IsCompletion: true, bytes, settled));

    /// <summary>Retries <paramref name="call"/>, which releases a claim, until it lands or <paramref name="giveUpAt"/>.</summary>
    public void AddRelease(IIdempotencyGrain grain, Func<IIdempotencyGrain, Task<bool>> call, DateTimeOffset giveUpAt) =>
        Add(new Write(grain, call, giveUpAt, IsCompletion: false, 0, null));

    /// <summary>Stops retrying; what still waits is logged, as its keys lapse into an unknown outcome.</summary>
    public void Dispose()
    {
        stopped.Cancel();
        lock (gate)
        {
            foreach (var write in completions.Concat(releases))
            {
                LogLeftWaiting(logger, write.Key, write.Kind);
                write.Settle(false);
            }

            completions.Clear();
            releases.Clear();
        }
    }

    private void Add(Write write)
    {
        bool start, admitted;
        lock (gate)
        {
            if (stopped.IsCancellationRequested)
            {
                LogLeftWaiting(logger, write.Key, write.Kind);
                write.Settle(false);
                return;
            }

            admitted = write.IsCompletion ? completionBytes + write.Bytes <= MaxCompletionBytes : releasesHeld < MaxReleases;
            if (admitted)
            {
                Hold(write, 1);
                Enqueue(write);
            }

            // A write refused for its bound still restarts a drain that died (a bound full while nothing drains is full
            // of queued writes), or those writes would wait for one to be admitted, which none would be.
            start = !draining;
            draining = true;
        }

        if (start)
        {
            _ = Task.Run(DrainAsync);
        }

        if (!admitted)
        {
            LogTooManyWaiting(logger, write.Key, write.Kind);
            write.Settle(false);
        }
    }

    private async Task DrainAsync()
    {
        while (true)
        {
            try
            {
                await DrainUntilEmptyAsync();
                return;
            }
            catch (Exception ex)
            {
                // Stopping, or a failure of the drain itself (a log that cannot be written, say). Writes still waiting
                // are drained again after a pause, not left until another write is added, which may never come.
                bool again;
                lock (gate)
                {
                    again = !stopped.IsCancellationRequested && completions.Count + releases.Count > 0;
                    draining = again;
                }

                if (stopped.IsCancellationRequested)
                {
                    return;
                }

                LogLines.TryWrite(logger, ex, static (log, ex) => LogDrainFailed(log, ex));

                if (!again || !await PauseAsync())
                {
                    return;
                }
            }
        }
    }

    // False when stopped meanwhile; then nothing drains any more.
    private async Task<bool> PauseAsync()
    {
        try
        {
            await Task.Delay(IdempotencyGrainCalls.Backoff(1), time, stopped.Token);
            return true;
        }
        catch (OperationCanceledException)
        {
            lock (gate)
            {
                draining = false;
            }

            return false;
        }
    }

    private async Task DrainUntilEmptyAsync()
    {
        // Every write of a batch failing turns the next into a probe of one, which rotates through the writes of both
        // kinds: one that fails for a reason of its own (its silo down, say) does not hold back the others once the
        // store is back. Some failing slows the batches down, without making them probes.
        var allFailed = 0;
        var givenUp = new List<Write>();
        var refused = new List<Write>();
        while (true)
        {
            var batch = Take(allFailed == 0 ? BatchSize : 1, givenUp);
            if (batch.Count == 0)
            {
                LogGivenUp(givenUp);
                return;
            }

            var tries = batch.Select(TryAsync).ToArray();
            try
            {
                await Task.WhenAll(tries);
            }
            catch (Exception)
            {
                // A try that threw (its failure could not be logged, say) is tried again like one that failed: a write
                // dropped here would stay counted against the bounds, and its key in doubt.
            }

            var failed = 0;
            lock (gate)
            {
                for (var i = 0; i < batch.Count; i++)
                {
                    if (tries[i].IsCompletedSuccessfully && tries[i].Result is { } taken)
                    {
                        Hold(batch[i], -1);
                        batch[i].Settle(taken);
                        if (!taken && batch[i].IsCompletion)
                        {
                            refused.Add(batch[i]);
                        }

                        continue;
                    }

                    failed++;
                    if (stopped.IsCancellationRequested)
                    {
                        LogLeftWaiting(logger, batch[i].Key, batch[i].Kind);
                        Hold(batch[i], -1);
                        batch[i].Settle(false);
                    }
                    else
                    {
                        Enqueue(batch[i]);
                    }
                }
            }

            // Logged once none of the writes taken is out: a log that cannot be written then ends the drain, losing none
            // and trying none again.
            LogGivenUp(givenUp);
            LogRefused(refused);
            allFailed = failed == batch.Count ? allFailed + 1 : 0;
            Volatile.Write(ref storeDown, allFailed > 0);
            if (failed > 0)
            {
                await Task.Delay(IdempotencyGrainCalls.Backoff(Math.Max(allFailed, 1)), time, stopped.Token);
            }
        }
    }

    // Up to count writes, completions first (a probe of one alternates), leaving out those whose time is up (added to
    // givenUp); none ends the drain.
    private List<Write> Take(int count, List<Write> givenUp)
    {
        var now = time.GetUtcNow();
        var batch = new List<Write>(count);
        lock (gate)
        {
            // A probe alternates between the two kinds: a completion failing for a reason of its own (its silo gone)
            // would otherwise be every probe, and keep the store looking down for the releases behind it.
            probeReleaseFirst = count == 1 && !probeReleaseFirst;
            var first = probeReleaseFirst ? releases : completions;
            var second = probeReleaseFirst ? completions : releases;
            while (batch.Count < count && (first.TryDequeue(out var write) || second.TryDequeue(out write)))
            {
                if (now < write.GiveUpAt)
                {
                    batch.Add(write);
                    continue;
                }

                Hold(write, -1);
                write.Settle(false);
                givenUp.Add(write);
            }

            draining = batch.Count > 0;
            if (!draining)
            {
                Volatile.Write(ref storeDown, false);
            }
        }

        return batch;
    }

    private void LogGivenUp(List<Write> givenUp)
    {
        foreach (var write in givenUp)
        {
            if (write.IsCompletion)
            {
                LogLeaseEnded(logger, write.Key);
            }
            else
            {
                LogRetentionEnded(logger, write.Key);
            }
        }

        givenUp.Clear();
    }

    private void LogRefused(List<Write> refused)
    {
        foreach (var write in refused)
        {
            LogCompletionRefused(logger, write.Key);
        }

        refused.Clear();
    }

    private void Enqueue(Write write) => (write.IsCompletion ? completions : releases).Enqueue(write);

    // Counts a write in (1) or out (-1) of the bounds; called under the gate.
    private void Hold(Write write, int sign)
    {
        if (write.IsCompletion)
        {
            completionBytes += sign * write.Bytes;
            completionsHeld += sign;
        }
        else
        {
            releasesHeld += sign;
        }
    }

    // Null when the write did not reach the store; else whether the store took it. Refused (a completion after its
    // lease, a release of a claim no longer held) is an answer too: done.
    private async Task<bool?> TryAsync(Write write)
    {
        try
        {
            return await write.Call(write.Grain);
        }
        catch (Exception ex)
        {
            LogStillFailing(logger, write.Key, ex.GetType().Name);
            return null;
        }
    }

    private sealed record Write(IIdempotencyGrain Grain, Func<IIdempotencyGrain, Task<bool>> Call, DateTimeOffset GiveUpAt, bool IsCompletion, long Bytes,
        Action<bool>? Settled)
    {
        public string Key => Grain.GetPrimaryKeyString();

        // Once per write, each ending in exactly one place; a callback that throws must not lose the drain its place.
        public void Settle(bool taken)
        {
            try
            {
                Settled?.Invoke(taken);
            }
            catch (Exception)
            {
                // What the caller counts is not worth a write.
            }
        }

        public string Kind => IsCompletion ? "completion" : "release";
    }

    [LoggerMessage(Level = LogLevel.Warning, Message = "Idempotency key {Key}: a background write failed ({Reason}); it waits for the store.")]
    private static partial void LogStillFailing(ILogger logger, string key, string reason);

    [LoggerMessage(Level = LogLevel.Error, Message = "Idempotency key {Key}: too many writes wait for the store; this {Write} is given up, and the claim it was to end lapses into an unknown outcome.")]
    private static partial void LogTooManyWaiting(ILogger logger, string key, string write);

    [LoggerMessage(Level = LogLevel.Error, Message = "Idempotency key {Key}: the API stopped while a {Write} waited for the store; the claim it was to end lapses into an unknown outcome.")]
    private static partial void LogLeftWaiting(ILogger logger, string key, string write);

    [LoggerMessage(Level = LogLevel.Error, Message = "Idempotency key {Key}: the store stayed unreachable for the whole lease; the claim lapses and its outcome becomes unknown.")]
    private static partial void LogLeaseEnded(ILogger logger, string key);

    [LoggerMessage(Level = LogLevel.Error, Message = "Idempotency key {Key}: the completion reached the store after the claim's lease had ended, and was refused; the outcome is unknown.")]
    private static partial void LogCompletionRefused(ILogger logger, string key);

    [LoggerMessage(Level = LogLevel.Warning, Message = "Idempotency key {Key}: the store stayed unreachable until the key's retention ended; its release is given up, as the key is forgotten.")]
    private static partial void LogRetentionEnded(ILogger logger, string key);

    [LoggerMessage(Level = LogLevel.Error, Message = "The background writes stopped draining; the next write waiting starts them again.")]
    private static partial void LogDrainFailed(ILogger logger, Exception exception);
}
