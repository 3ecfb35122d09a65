using Microsoft.Extensions.Options;
using Orleans.Runtime;
using Orleans.Runtime.Messaging;
using OrleansIdempotency.Grains;

namespace OrleansIdempotency.AspNetCore;

/// <summary>The store or the cluster could not be reached in time: nothing was decided that the caller can rely on.</summary>
/// <param name="key">The key asked about, as its grain is named (scope and key): the same key sent by two callers is two keys.</param>
/// <param name="message">What failed.</param>
/// <param name="inner">The last failure.</param>
public sealed class IdempotencyUnavailableException(string key, string message, Exception inner) : Exception(message, inner)
{
    /// <summary>The key asked about, scope and key, as the layer's log lines name keys.</summary>
    public string Key { get; } = key;
}

/// <summary>
/// Calls key grains the way DESIGN §3 asks. A call whose answer was lost in the cluster (a silo died, a message
/// timed out) is made again, with the same arguments and so the same attempt id, until
/// <see cref="IdempotencyOptions.ClusterRetryBudget"/> runs out: a claim that was written before its silo died is
/// recovered, not stranded. A storage error is retried once at once (a pooled connection broken by a database
/// restart fails exactly once), then reported: the layer fails closed.
/// </summary>
internal sealed partial class IdempotencyGrainCalls(
    IGrainFactory grains,
    IOptions<IdempotencyOptions> options,
    TimeProvider time,
    ILogger<IdempotencyGrainCalls> logger) : IDisposable
{
    private readonly BackgroundWrites background = new(time, logger);

    public IIdempotencyGrain Grain(IdempotencyKey key) => grains.GetIdempotencyGrain(key);

    /// <exception cref="IdempotencyUnavailableException">The cluster or the store did not answer.</exception>
    public async Task<T> CallAsync<T>(IIdempotencyGrain grain, Func<IIdempotencyGrain, Task<T>> call, CancellationToken cancellationToken)
    {
        var deadline = time.GetUtcNow() + options.Value.ClusterRetryBudget;
        var storeFailures = 0;
        Exception? firstFailure = null;
        for (var attempt = 1; ; attempt++)
        {
            T answer;
            try
            {
                answer = await call(grain);
            }
            catch (Exception ex) when (IsLostInCluster(ex) && time.GetUtcNow() < deadline && !cancellationToken.IsCancellationRequested)
            {
                firstFailure ??= ex;
                LogAskingAgain(grain, attempt, ex);
                await Task.Delay(Backoff(attempt), time, cancellationToken);
                continue;
            }
            catch (Exception ex) when (!IsLostInCluster(ex) && !CallerLeft(ex, cancellationToken) && ++storeFailures == 1)
            {
                firstFailure ??= ex;
                LogAskingAgain(grain, attempt, ex);
                continue;
            }
            catch (Exception ex) when (!CallerLeft(ex, cancellationToken))
            {
                var key = grain.GetPrimaryKeyString();
                throw new IdempotencyUnavailableException(key, $"The idempotency store did not answer for {key}: {ex.Message}", ex);
            }

            // Outside the try: a line that cannot be written is not the store failing, and the answer stands.
            if (firstFailure is not null)
            {
                LogAnsweredAfterFailing(grain, attempt, firstFailure);
            }

            return answer;
        }
    }

    /// <inheritdoc cref="CallAsync{T}"/>
    public Task CallAsync(IIdempotencyGrain grain, Func<IIdempotencyGrain, Task> call, CancellationToken cancellationToken) =>
        CallAsync(grain, async g =>
        {
            await call(g);
            return true;
        }, cancellationToken);

    /// <summary>
    /// Claims the key for <paramref name="request"/>; while another attempt holds it, waits for that claim to end and
    /// asks again, for up to <paramref name="wait"/> in all (zero: not at all). When the claim's answer never comes
    /// (the store or the cluster failed, or the caller left), the claim, which may have been written all the same, is
    /// given back if <paramref name="releaseUnanswered"/>: else its lease would lapse into an unknown outcome. So is a
    /// claim acquired for a caller that has left meanwhile, which then gets <see cref="OperationCanceledException"/>.
    /// </summary>
    /// <returns>
    /// The last answer (<see cref="ClaimOutcome.InProgress"/> when the wait ran out) and when it was asked for: a claim
    /// it gives was written after that, so its lease ends no sooner than then plus the lease.
    /// </returns>
    /// <exception cref="IdempotencyUnavailableException">The cluster or the store did not answer.</exception>
    public async Task<(ClaimResult Claim, DateTimeOffset AskedAt)> ClaimAsync(
        IIdempotencyGrain grain, ClaimRequest request, TimeSpan wait, bool releaseUnanswered, CancellationToken cancellationToken)
    {
        var askedAt = time.GetUtcNow();
        var waitUntil = askedAt + wait;
        // Declared beside the captured request: one object of captured state per claim, not one more per round.
        var tries = 0;
        while (true)
        {
            // Nothing is held yet: a caller that has left claims nothing more.
            cancellationToken.ThrowIfCancellationRequested();
            ClaimResult claim;
            try
            {
                // Once a try went unanswered, the claim may be written where later tries do not land (ClaimRequest).
                tries = 0;
                claim = await CallAsync(grain, g =>
                {
                    if (tries++ > 0 && !request.MayHaveAskedBefore)
                    {
                        request = request with { MayHaveAskedBefore = true };
                    }

                    return g.ClaimAsync(request);
                }, cancellationToken);
            }
            catch (Exception ex) when (releaseUnanswered
                && (ex is IdempotencyUnavailableException || (ex is OperationCanceledException && cancellationToken.IsCancellationRequested)))
            {
                _ = ReleaseAsync(grain, request.AttemptId, request.Lease, request.Retention);
                throw;
            }

            if (claim.Outcome == ClaimOutcome.Acquired && releaseUnanswered && cancellationToken.IsCancellationRequested)
            {
                // The caller left while its claim was written: nothing has run, and no one would hear of the claim,
                // which would otherwise lapse into an unknown outcome.
                _ = ReleaseAsync(grain, request.AttemptId, request.Lease, request.Retention);
                cancellationToken.ThrowIfCancellationRequested();
            }

            if (claim.Outcome != ClaimOutcome.InProgress)
            {
                return (claim, askedAt);
            }

            var now = time.GetUtcNow();
            if (now >= waitUntil)
            {
                return (claim, askedAt);
            }

            await CallAsync(grain, g => g.WaitAsync(waitUntil - now), cancellationToken);
            askedAt = time.GetUtcNow();
        }
    }

    /// <summary>
    /// Releases the attempt's claim; if the store cannot be reached now, the release waits in the background for it
    /// until the key's <paramref name="retention"/> ends: the attempt's own release frees its key even once the lease
    /// has lapsed into an unknown outcome, so a longer outage leaves no key in doubt for an action that never ran.
    /// </summary>
    public async Task ReleaseAsync(IIdempotencyGrain grain, Guid attemptId, TimeSpan lease, TimeSpan retention)
    {
        Func<IIdempotencyGrain, Task<bool>> release = g => g.ReleaseAsync(attemptId, lease);
        // While the store seems down it waits its turn at once: during an outage every failed request leaves a release.
        if (!background.StoreSeemsDown)
        {
            try
            {
                await CallAsync(grain, release, CancellationToken.None);
                return;
            }
            catch (IdempotencyUnavailableException)
            {
                // It waits in the background, as below.
            }
        }

        background.AddRelease(grain, release, time.GetUtcNow() + retention);
    }

    /// <summary>
    /// Stores the action's response. If the store cannot be reached now, the completion waits in the background for
    /// it until the claim's <paramref name="lease"/> ends, after which the store refuses it: the action has run, and
    /// a completion that lands before the lease lapses spares the key an unknown outcome.
    /// </summary>
    /// <returns>
    /// True when stored; false when the claim was stale or had lapsed (the store refused it); null when it waits in
    /// the background. Either way <paramref name="settled"/> is told, once, whether the store took it: at once, or
    /// when the background write lands or is given up.
    /// </returns>
    public async Task<bool?> CompleteAsync(IIdempotencyGrain grain, ClaimToken token, StoredResponse response, TimeSpan lease, Action<bool>? settled = null)
    {
        Func<IIdempotencyGrain, Task<bool>> complete = g => g.CompleteAsync(token, response);
        try
        {
            var taken = await CallAsync(grain, complete, CancellationToken.None);
            settled?.Invoke(taken);
            return taken;
        }
        catch (IdempotencyUnavailableException)
        {
            background.AddCompletion(grain, complete, response.Body.Length + response.HeaderChars, time.GetUtcNow() + lease, settled);
            return null;
        }
    }

    /// <summary>How many releases and completions wait in the background for the store.</summary>
    public int WaitingForTheStore => background.Waiting;

    /// <summary>Like <see cref="WaitingForTheStore"/>, counting those out being tried; read without a lock.</summary>
    public int HeldForTheStore => background.Held;

    /// <summary>Stops the background writes, logging what still waits.</summary>
    public void Dispose() => background.Dispose();

    internal static TimeSpan Backoff(int attempt) => TimeSpan.FromMilliseconds(Math.Min(1000, 50 * (1 << Math.Min(attempt, 5))));

    // A cancellation is the caller's only when the caller cancelled: one from within (a storage command cancelled on
    // its own) is the store failing, and fails closed like any other failure instead of escaping as a 500.
    private static bool CallerLeft(Exception exception, CancellationToken cancellationToken) =>
        exception is OperationCanceledException && cancellationToken.IsCancellationRequested;

    /// <summary>The answer may be lost rather than negative: the call may have run, and asking again is safe.</summary>
    private static bool IsLostInCluster(Exception exception) => exception is TimeoutException
        or SiloUnavailableException
        or OrleansMessageRejectionException
        or ConnectionFailedException
        or GatewayTooBusyException
        or ClientNotAvailableException;

    // Debug: in an outage every request asks again for the whole retry budget, and a line for each try would bury the
    // one line each request ends with (answered after failing, or its 503).
    // The key's text is made only for a line that is written (CA1873 does not see these guards). A log that cannot be
    // written changes nothing: a call is neither asked again nor failed for it.
#pragma warning disable CA1873
    private void LogAskingAgain(IIdempotencyGrain grain, int attempt, Exception failure) =>
        LogLines.TryWrite(logger, (grain, attempt, failure), static (log, s) =>
        {
            if (log.IsEnabled(LogLevel.Debug))
            {
                LogAskingAgain(log, s.grain.GetPrimaryKeyString(), s.attempt, s.failure.GetType().Name);
            }
        });

    private void LogAnsweredAfterFailing(IIdempotencyGrain grain, int attempt, Exception firstFailure) =>
        LogLines.TryWrite(logger, (grain, attempt, firstFailure), static (log, s) =>
        {
            if (log.IsEnabled(LogLevel.Information))
            {
                LogAnsweredAfterFailing(log, s.grain.GetPrimaryKeyString(), s.attempt, s.firstFailure.GetType().Name);
            }
        });
#pragma warning restore CA1873

    [LoggerMessage(Level = LogLevel.Debug, Message = "Idempotency key {Key}: call {Attempt} failed ({Reason}); asking again.")]
    private static partial void LogAskingAgain(ILogger logger, string key, int attempt, string reason);

    [LoggerMessage(Level = LogLevel.Information, Message = "Idempotency key {Key}: answered at attempt {Attempt}, after the first failed ({Reason}).")]
    private static partial void LogAnsweredAfterFailing(ILogger logger, string key, int attempt, string reason);
}
