using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging;
using Orleans.Storage;

namespace OrleansIdempotency.Grains;

/// <summary>
/// Applies <see cref="IdempotencyTransitions"/> to the key's record, one call at a time, persisting each change
/// before it answers. Not reentrant: the guarantee rests on one call at a time; only <see cref="WaitAsync"/>
/// interleaves, and it never changes state.
/// </summary>
/// <remarks>
/// The record is read lazily, not on activation: most keys are new, and a claim of a key this activation has not
/// read is first written as if the key were absent. Storage refuses that write (a write without an ETag creates,
/// never overwrites) when the record exists; the activation then reads it and decides again. A new key costs one
/// write instead of a read and a write; a key claimed again after its activation was collected costs one refused
/// write more.
/// </remarks>
public sealed partial class IdempotencyGrain(
    [FromKeyedServices(IdempotencyGrain.StorageName)] IGrainStorage storage,
    TimeProvider time,
    ILogger<IdempotencyGrain> logger) : Grain, IIdempotencyGrain
{
    /// <summary>The name of the grain storage provider that holds the records.</summary>
    public const string StorageName = "idempotency";

    /// <summary>The name the record is stored under (the grain's only state).</summary>
    public const string StateName = "record";

    // Another activation of this key (possible while membership changes) may write between our read and our
    // write; each conflict re-reads what it wrote and decides again. More than a few means something is wrong.
    private const int MaxWriteConflicts = 3;

    /// <summary>
    /// The longest one <see cref="WaitAsync"/> call waits. A wait is a running request, and Orleans lets running
    /// requests finish before it deactivates an activation, so this bounds how long waiters can hold up a
    /// deactivation (a silo shutting down, a rebalance). Callers wait longer by calling again.
    /// </summary>
    public static readonly TimeSpan MaxWait = TimeSpan.FromSeconds(1);

    /// <summary>How old a copy of a record in progress or in doubt may be before a call reads it again.</summary>
    public static readonly TimeSpan UnsettledFreshness = TimeSpan.FromSeconds(1);

    /// <summary>How long the caller of a state change waits for its answer (<see cref="IIdempotencyGrain.CallTimeout"/>).</summary>
    private static readonly TimeSpan CallerPatience = TimeSpan.Parse(IIdempotencyGrain.CallTimeout, System.Globalization.CultureInfo.InvariantCulture);

    // The record as storage last saw it (ETag, RecordExists) and the record this activation decides on.
    private readonly GrainState<IdempotencyRecord> stored = new();
    private IdempotencyRecord record = new();
    private TaskCompletionSource? changed;

    // A duplicate found the key in progress: more retries of it are likely, so the activation stays after completion.
    private bool contested;

    // False until the record is read or written, and again after a write whose outcome is unknown or refused: the
    // copy in memory must then not be trusted.
    private bool current;

    // When the copy was last read or written (a TimeProvider timestamp: monotonic). A copy that says "in progress" or
    // "outcome unknown" is read again once it is older than UnsettledFreshness: another activation of the key (while
    // membership changes) may have completed or resolved it, and callers asking this one would otherwise be told the
    // old state until the lease lapses, or for as long as this activation lives.
    private long currentAt;

    public async Task<ClaimResult> ClaimAsync(ClaimRequest request)
    {
        // The claim that lapsed, when this claim is what turned its lapse into an outcome (decided again on a conflict).
        ClaimToken? lapsed = null;
        var result = await ApplyAsync((state, now) =>
        {
            var transition = IdempotencyTransitions.Claim(state, request, now);
            // As the transition sees it: a record past its retention is a new key, whatever lease it lapsed with.
            var seen = state.AsOf(now);
            lapsed = seen.Status == IdempotencyStatus.InProgress && now >= seen.LeaseExpiresAt && transition.Next is not null
                && seen.AttemptId != request.AttemptId ? seen.Token : null;
            return transition;
        }, request.MayHaveAskedBefore ? RefusedFromCopy : null, mayAssumeAbsent: true);
        contested |= result.Outcome == ClaimOutcome.InProgress;
        if (lapsed is { } claim)
        {
            // No request is left to say so: its holder died or went quiet, and this is the only place that knows.
            if (result.Outcome == ClaimOutcome.Acquired)
            {
                LogLapsedReclaimed(logger, this.GetPrimaryKeyString(), ClaimTokenText.Format(claim));
            }
            else
            {
                LogLapsedInDoubt(logger, this.GetPrimaryKeyString(), ClaimTokenText.Format(claim));
            }
        }

        return result;
    }

    // A key the copy shows held by another attempt, or in doubt, may since have been given back and claimed by this
    // attempt through another activation: read first. A completed key is final, and a key keeps its request's
    // fingerprint for its retention, so a copy's Completed or Mismatch is the record's too.
    private static bool RefusedFromCopy(ClaimResult claim) => claim.Outcome is ClaimOutcome.InProgress or ClaimOutcome.OutcomeUnknown;

    public async Task<bool> CompleteAsync(ClaimToken token, StoredResponse response)
    {
        var completed = await ApplyAsync((state, now) => IdempotencyTransitions.Complete(state, token, response, now), Refused);
        if (completed && !contested)
        {
            // Most keys are asked for once. Keeping their activations until the collection age (minutes, at thousands
            // of keys a second) held hundreds of thousands of them, and the garbage collector took a third of all CPU
            // samples (perf, embedded new keys). A later replay reads the record from storage; a key that a duplicate
            // found in progress stays, because its retries are still coming.
            DeactivateOnIdle();
        }

        return completed;
    }

    public Task<bool> RenewAsync(ClaimToken token, TimeSpan lease) =>
        ApplyAsync((state, now) => IdempotencyTransitions.Renew(state, token, lease, now), Refused);

    public Task<bool> ReleaseAsync(Guid attemptId, TimeSpan lease) =>
        ApplyAsync((state, now) => IdempotencyTransitions.Release(state, attemptId, lease, now), Refused);

    public Task<bool> ReleaseClaimAsync(ClaimToken token, TimeSpan lease) =>
        ApplyAsync((state, now) => IdempotencyTransitions.ReleaseClaim(state, token, lease, now), Refused);

    public Task<ResolveOutcome> ResolveAsync(StoredResponse? outcome, ClaimToken? claim) =>
        ApplyAsync((state, now) => IdempotencyTransitions.Resolve(state, outcome, claim, now), static outcome => outcome != ResolveOutcome.Settled);

    public async Task WaitAsync(TimeSpan timeout)
    {
        var now = time.GetUtcNow();
        var state = record.AsOf(now);
        if (!current || state.Status != IdempotencyStatus.InProgress)
        {
            return;
        }

        // Wake at the lease's end too: the waiter's next claim is what turns a lapsed lease into its outcome.
        var untilLapse = state.LeaseExpiresAt - now;
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
        await ReadIfNotCurrentAsync();
        return record.AsOf(time.GetUtcNow());
    }

    public override Task OnDeactivateAsync(DeactivationReason reason, CancellationToken cancellationToken)
    {
        // Waiters return and claim again, which reaches the key's next activation.
        Signal();
        return Task.CompletedTask;
    }

    private static bool Refused(bool done) => !done;

    /// <param name="decide">The transition, given the record as of now.</param>
    /// <param name="refused">
    /// Which of the call's answers refuse its caller's claim (stale, lapsed, not this caller's). Such an answer, given
    /// without a write, is only ever given from a copy read during the call: the ETag check fences every write, but
    /// nothing fences a refusal, and a copy this activation holds may be out of date while membership changes (another
    /// activation of the key claimed it meanwhile; this copy still says the key is free).
    /// </param>
    /// <param name="mayAssumeAbsent">
    /// Decide on a record never read as if the key were absent: sound only where the write that follows is refused
    /// when it is not (see the remarks on the class).
    /// </param>
    private async Task<T> ApplyAsync<T>(Func<IdempotencyRecord, DateTimeOffset, Transition<T>> decide, Func<T, bool>? refused = null, bool mayAssumeAbsent = false)
    {
        var callerGivesUpAt = time.GetUtcNow() + CallerPatience;
        var assumeAbsent = mayAssumeAbsent && stored.ETag is null && !stored.RecordExists;
        // A refused create of a key that exists is the expected price of assuming it absent, not a conflict.
        var maxAttempts = MaxWriteConflicts + (assumeAbsent ? 2 : 1);
        for (var attempt = 1; ; attempt++)
        {
            if (attempt > 1 && time.GetUtcNow() >= callerGivesUpAt)
            {
                // A write that took this long was stuck (storage unreachable, then back); its caller has timed out and
                // been told nothing was decided. Deciding again now would claim the key for nobody.
                throw new TimeoutException($"The record of {this.GetPrimaryKeyString()} could not be written while its caller waited; nothing was decided.");
            }

            var readNow = false;
            if (!(assumeAbsent && attempt == 1))
            {
                readNow = await ReadIfNotCurrentAsync();
            }

            var (result, next) = decide(record, time.GetUtcNow());
            if (next is null)
            {
                if (!readNow && refused?.Invoke(result) == true)
                {
                    // Not a write conflict: the read costs none of the attempts they are allowed.
                    current = false;
                    maxAttempts++;
                    continue;
                }

                return result;
            }

            if (await TryWriteAsync(next))
            {
                Signal();
                return result;
            }

            if (attempt == maxAttempts)
            {
                throw new InconsistentStateException(
                    $"The record of {this.GetPrimaryKeyString()} kept changing under this activation; nothing was decided.");
            }
        }
    }

    /// <returns>True when written; false when another activation wrote first (the state is then re-read).</returns>
    private async Task<bool> TryWriteAsync(IdempotencyRecord next)
    {
        stored.State = next;
        try
        {
            await storage.WriteStateAsync(StateName, this.GetGrainId(), stored);
            stored.RecordExists = true;
            record = next;
            current = true;
            currentAt = time.GetTimestamp();
            return true;
        }
        catch (InconsistentStateException)
        {
            // The ETag check fenced us off: the record exists, or another activation changed it. Never answer from
            // our copy.
            current = false;
            return false;
        }
        catch
        {
            // The write may or may not have committed (a timeout, a dropped connection). Re-read before deciding
            // again: if it committed, the same attempt asking again finds its claim.
            current = false;
            throw;
        }
    }

    /// <returns>True when it read.</returns>
    private async Task<bool> ReadIfNotCurrentAsync()
    {
        var unsettled = record.Status is IdempotencyStatus.InProgress or IdempotencyStatus.OutcomeUnknown;
        if (!current || (unsettled && time.GetElapsedTime(currentAt) >= UnsettledFreshness))
        {
            var before = record.Status;
            await storage.ReadStateAsync(StateName, this.GetGrainId(), stored);
            record = stored.State ?? new IdempotencyRecord();
            current = true;
            // Stamped once read: a slow read must not leave the copy stale on arrival, for every queued call to read again.
            currentAt = time.GetTimestamp();
            if (record.Status != before)
            {
                // Changed elsewhere: waiters here learn it now, not at the end of their wait.
                Signal();
            }

            return true;
        }

        return false;
    }

    private void Signal()
    {
        changed?.TrySetResult();
        changed = null;
    }

    [LoggerMessage(Level = LogLevel.Warning, Message = "Idempotency key {Key}: the lease of claim {Claim} lapsed without completion (its holder died or went quiet); the key's outcome is unknown until an operator settles it.")]
    private static partial void LogLapsedInDoubt(ILogger logger, string key, string claim);

    [LoggerMessage(Level = LogLevel.Warning, Message = "Idempotency key {Key}: the lease of claim {Claim} lapsed without completion, and the key is claimed again as its policy allows: the action may run twice.")]
    private static partial void LogLapsedReclaimed(ILogger logger, string key, string claim);
}
