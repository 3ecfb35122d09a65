using OrleansIdempotency.Grains;

namespace OrleansIdempotency.AspNetCore;

internal sealed partial class IdempotencyMiddleware
{
    /// <summary>
    /// Renews a claim every third of its lease while the action runs, so a long action keeps its claim and a dead
    /// process loses it within one lease.
    /// </summary>
    private sealed class LeaseRenewal : IAsyncDisposable
    {
        private readonly CancellationTokenSource stop = new();
        private readonly Task loop;

        public LeaseRenewal(IIdempotencyGrain grain, ClaimToken token, TimeSpan lease, TimeProvider time, ILogger logger)
        {
            loop = RenewAsync(grain, token, lease, time, logger, stop.Token);
        }

        public async ValueTask DisposeAsync()
        {
            if (!stop.IsCancellationRequested)
            {
                await stop.CancelAsync();
                await loop;
                stop.Dispose();
            }
        }

        private static async Task RenewAsync(IIdempotencyGrain grain, ClaimToken token, TimeSpan lease, TimeProvider time, ILogger logger, CancellationToken cancellationToken)
        {
            using var timer = new PeriodicTimer(lease / 3, time);
            try
            {
                while (await timer.WaitForNextTickAsync(cancellationToken))
                {
                    try
                    {
                        if (!await grain.RenewAsync(token, lease))
                        {
                            LogRenewalFailed(logger, grain.GetPrimaryKeyString(), "the claim is no longer held");
                            return;
                        }
                    }
                    catch (Exception ex) when (ex is not OperationCanceledException)
                    {
                        // The next tick tries again; the lease has two more thirds to go.
                        LogRenewalFailed(logger, grain.GetPrimaryKeyString(), ex.GetType().Name);
                    }
                }
            }
            catch (OperationCanceledException)
            {
                // The action finished.
            }
        }
    }
}
