using OrleansIdempotency.Grains;

namespace OrleansIdempotency.AspNetCore;

/// <summary>
/// Renews a claim while the action runs, so a long action keeps its claim and a dead process loses it within one
/// lease. A timer, not a loop: most actions end before the first tick, and then this costs one timer and no task
/// or exception.
/// </summary>
/// <remarks>
/// Each renewal comes at half of what is left of the lease, at most a third of a lease after the last: a renewal
/// that fails leaves time for another, and a claim that arrived with less than its lease left (one recovered after
/// a lost answer keeps the lease it was written with) is renewed in time. What is left is reckoned on this
/// process's clock, from when the claim or renewal was asked for: never later than the grain's own reckoning.
/// Past that reckoning the renewals go on, a tenth of a lease apart, until the grain answers or the action ends: a
/// renewal that failed may have landed (its answer lost), and only the grain knows whether its lease still runs
/// (it refuses a renewal of one that lapsed).
/// </remarks>
internal sealed partial class LeaseRenewal : IDisposable
{
    // Near the lease's end, half of what is left shrinks towards nothing: renewals that keep failing are not spun.
    private static readonly TimeSpan ShortestWait = TimeSpan.FromMilliseconds(100);

    private readonly IIdempotencyGrain grain;
    private readonly ClaimToken token;
    private readonly TimeSpan lease;
    private readonly TimeProvider time;
    private readonly ILogger logger;
    private readonly ITimer timer;
    private DateTimeOffset leaseEndsBy;
    private bool stopped;

    // leaseEndsBy: when the claim's lease ends at the earliest, as this process reckons it (asked for + lease).
    public LeaseRenewal(IIdempotencyGrain grain, ClaimToken token, DateTimeOffset leaseEndsBy, TimeSpan lease, TimeProvider time, ILogger logger)
    {
        this.grain = grain;
        this.token = token;
        this.lease = lease;
        this.time = time;
        this.logger = logger;
        this.leaseEndsBy = leaseEndsBy;
        // Started once assigned: a tick due at once (a lease of a few milliseconds) reschedules the timer it is run by.
        timer = time.CreateTimer(static state => ((LeaseRenewal)state!).Tick(), this, Timeout.InfiniteTimeSpan, Timeout.InfiniteTimeSpan);
        timer.Change(UntilNextRenewal(), Timeout.InfiniteTimeSpan);
    }

    public void Dispose()
    {
        Volatile.Write(ref stopped, true);
        timer.Dispose();
    }

    private TimeSpan UntilNextRenewal()
    {
        var third = lease / 3;
        var left = leaseEndsBy - time.GetUtcNow();
        if (left <= TimeSpan.Zero)
        {
            return TimeSpan.FromTicks(Math.Max(lease.Ticks / 10, ShortestWait.Ticks));
        }

        return TimeSpan.FromTicks(Math.Clamp(left.Ticks / 2, Math.Min(ShortestWait.Ticks, third.Ticks), third.Ticks));
    }

    private async void Tick()
    {
        if (Volatile.Read(ref stopped))
        {
            return;
        }

        var askedAt = time.GetUtcNow();
        try
        {
            if (!await grain.RenewAsync(token, lease))
            {
                // Not when the action ended while this renewal was out: its completion or release may have been taken
                // first, and then the claim is rightly no longer held.
                var actionEnded = Volatile.Read(ref stopped);
                Dispose();
                if (!actionEnded)
                {
                    LogLost();
                }

                return;
            }

            leaseEndsBy = askedAt + lease;
        }
        catch (Exception ex)
        {
            LogFailure(ex.GetType().Name);
        }

        if (Volatile.Read(ref stopped))
        {
            return;
        }

        try
        {
            timer.Change(UntilNextRenewal(), Timeout.InfiniteTimeSpan);
        }
        catch (ObjectDisposedException)
        {
            // The action ended while this renewal was out.
        }
    }

    // Tick is a timer's async void: a throw escaping it would end the process, and every action running in it, for a
    // log that cannot be written.
    private void LogFailure(string reason) =>
        LogLines.TryWrite(logger, (grain, reason), static (log, s) => LogRenewalFailed(log, s.grain.GetPrimaryKeyString(), s.reason));

    private void LogLost() =>
        LogLines.TryWrite(logger, (grain, token), static (log, s) => LogClaimLost(log, s.grain.GetPrimaryKeyString(), ClaimTokenText.Format(s.token)));

    [LoggerMessage(Level = LogLevel.Error, Message = "Idempotency key {Key}: the action still runs, but its claim {Claim} is no longer held (its lease lapsed before a renewal landed, or the key was released or settled): its outcome will not be stored, and the key is in doubt, or under Reclaim open to another attempt.")]
    private static partial void LogClaimLost(ILogger logger, string key, string claim);

    [LoggerMessage(Level = LogLevel.Warning, Message = "Idempotency key {Key}: renewing the lease failed ({Reason}).")]
    private static partial void LogRenewalFailed(ILogger logger, string key, string reason);
}
