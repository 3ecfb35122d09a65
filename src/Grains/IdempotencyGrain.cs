using Orleans.Storage;

namespace OrleansIdempotency.Grains;

/// <summary>
/// Applies <see cref="IdempotencyTransitions"/> to the key's record, one call at a time, persisting each change
/// before it answers. Not reentrant: the guarantee rests on one call at a time; only <see cref="WaitAsync"/>
/// interleaves, and it never changes state.
/// </summary>
public sealed class IdempotencyGrain(
    [PersistentState("record", IdempotencyGrain.StorageName)] IPersistentState<IdempotencyRecord> record,
    TimeProvider time) : Grain, IIdempotencyGrain
{
    /// <summary>The name of the grain storage provider that holds the records.</summary>
    public const string StorageName = "idempotency";

    // Another activation of this key (possible while membership changes) may write between our read and our
    // write; each conflict re-reads what it wrote and decides again. More than a few means something is wrong.
    private const int MaxWriteConflicts = 3;

    /// <summary>
    /// The longest one <see cref="WaitAsync"/> call waits. A wait is a running request, and Orleans lets running
    /// requests finish before it deactivates an activation, so this bounds how long waiters can hold up a
    /// deactivation (a silo shutting down, a rebalance). Callers wait longer by calling again.
    /// </summary>
    public static readonly TimeSpan MaxWait = TimeSpan.FromSeconds(1);

    private TaskCompletionSource? changed;
    private bool stale;

    public Task<ClaimResult> ClaimAsync(ClaimRequest request) =>
        ApplyAsync((stored, now) => IdempotencyTransitions.Claim(stored, request, now));

    public Task<bool> CompleteAsync(ClaimToken token, StoredResponse response) =>
        ApplyAsync((stored, now) => IdempotencyTransitions.Complete(stored, token, response, now));

    public Task<bool> RenewAsync(ClaimToken token, TimeSpan lease) =>
        ApplyAsync((stored, now) => IdempotencyTransitions.Renew(stored, token, lease, now));

    public Task<bool> ReleaseAsync(Guid attemptId) =>
        ApplyAsync((stored, now) => IdempotencyTransitions.Release(stored, attemptId, now));

    public Task<bool> ResolveAsync(StoredResponse? outcome) =>
        ApplyAsync((stored, now) => IdempotencyTransitions.Resolve(stored, outcome, now));

    public async Task WaitAsync(TimeSpan timeout)
    {
        var now = time.GetUtcNow();
        var current = record.State.AsOf(now);
        if (stale || current.Status != IdempotencyStatus.InProgress)
        {
            return;
        }

        // Wake at the lease's end too: the waiter's next claim is what turns a lapsed lease into its outcome.
        var untilLapse = current.LeaseExpiresAt - now;
        var wait = TimeSpan.FromTicks(Math.Min(Math.Min(timeout.Ticks, untilLapse.Ticks), MaxWait.Ticks));
        if (wait <= TimeSpan.Zero)
        {
            return;
        }

        changed ??= new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        try
        {
            await changed.Task.WaitAsync(wait, time);
        }
        catch (TimeoutException)
        {
            // The caller claims again and learns where the key stands.
        }
    }

    public async Task<IdempotencyRecord> GetAsync()
    {
        await RefreshIfStaleAsync();
        return record.State.AsOf(time.GetUtcNow());
    }

    public override Task OnDeactivateAsync(DeactivationReason reason, CancellationToken cancellationToken)
    {
        // Waiters return and claim again, which reaches the key's next activation.
        Signal();
        return Task.CompletedTask;
    }

    private async Task<T> ApplyAsync<T>(Func<IdempotencyRecord, DateTimeOffset, Transition<T>> decide)
    {
        for (var conflicts = 0; ; conflicts++)
        {
            await RefreshIfStaleAsync();
            var (result, next) = decide(record.State, time.GetUtcNow());
            if (next is null)
            {
                return result;
            }

            if (await TryWriteAsync(next))
            {
                Signal();
                return result;
            }

            if (conflicts == MaxWriteConflicts)
            {
                throw new InconsistentStateException(
                    $"The record of {this.GetPrimaryKeyString()} kept changing under this activation; nothing was decided.");
            }
        }
    }

    /// <returns>True when written; false when another activation wrote first (the state is then re-read).</returns>
    private async Task<bool> TryWriteAsync(IdempotencyRecord next)
    {
        var previous = record.State;
        record.State = next;
        try
        {
            await record.WriteStateAsync();
            return true;
        }
        catch (InconsistentStateException)
        {
            // The ETag check fenced us off: another activation changed the record. Never answer from our copy.
            record.State = previous;
            stale = true;
            return false;
        }
        catch
        {
            // The write may or may not have committed (a timeout, a dropped connection). Re-read before deciding
            // again: if it committed, the same attempt asking again finds its claim.
            record.State = previous;
            stale = true;
            throw;
        }
    }

    private async Task RefreshIfStaleAsync()
    {
        if (stale)
        {
            await record.ReadStateAsync();
            stale = false;
        }
    }

    private void Signal()
    {
        changed?.TrySetResult();
        changed = null;
    }
}
