using OrleansIdempotency.Grains;

namespace OrleansIdempotency.AspNetCore;

internal sealed partial class IdempotencyMiddleware
{
    /// <summary>
    /// Renews a claim every third of its lease while the action runs, so a long action keeps its claim and a dead
    /// process loses it within one lease. A timer, not a loop: most actions end before the first tick, and then
    /// this costs one timer and no task or exception.
    /// </summary>
    /// <remarks>
    /// The first renewal comes sooner when the claim arrived with less than its lease left: a claim recovered after a
    /// lost answer keeps the lease it was given when it was written, up to a retry budget earlier.
    /// </remarks>
    private sealed class LeaseRenewal : IDisposable
    {
        private readonly IIdempotencyGrain grain;
        private readonly ClaimToken token;
        private readonly TimeSpan lease;
        private readonly ILogger logger;
        private readonly ITimer timer;
        private bool stopped;

        public LeaseRenewal(IIdempotencyGrain grain, ClaimToken token, DateTimeOffset leaseExpiresAt, TimeSpan lease, TimeProvider time, ILogger logger)
        {
            this.grain = grain;
            this.token = token;
            this.lease = lease;
            this.logger = logger;
            var halfOfWhatIsLeft = (leaseExpiresAt - time.GetUtcNow()) / 2;
            var first = TimeSpan.FromTicks(Math.Clamp(halfOfWhatIsLeft.Ticks, 0, (lease / 3).Ticks));
            timer = time.CreateTimer(static state => ((LeaseRenewal)state!).Tick(), this, first, lease / 3);
        }

        public void Dispose()
        {
            Volatile.Write(ref stopped, true);
            timer.Dispose();
        }

        private async void Tick()
        {
            // Ticks may overlap only if a renewal takes longer than a third of the lease; two renewals of one claim
            // are harmless (the grain applies them one after the other).
            if (Volatile.Read(ref stopped))
            {
                return;
            }

            try
            {
                if (!await grain.RenewAsync(token, lease))
                {
                    LogRenewalFailed(logger, grain.GetPrimaryKeyString(), "the claim is no longer held");
                    Dispose();
                }
            }
            catch (Exception ex)
            {
                LogRenewalFailed(logger, grain.GetPrimaryKeyString(), ex.GetType().Name);
            }
        }
    }
}
