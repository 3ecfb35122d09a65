using Microsoft.Extensions.Logging;
using Orleans.Clustering.Redis;
using StackExchange.Redis;

namespace OrleansIdempotency.Silo.Hosting;

/// <summary>
/// Orleans reads the membership table once as a silo starts, and a Redis not yet up (or restarting) failed the start at
/// its first command's time-out: Redis is waited for first, up to <see cref="Timeout"/>, as PostgreSQL is, while the
/// multiplexer retries its connection. The warning names why there is none (a refused password, say, which waiting
/// does not heal: StackExchange.Redis does not report it apart reliably, so it is waited out like any other).
/// </summary>
internal static partial class RedisStartupWait
{
    /// <summary>How long a starting silo waits for Redis to accept connections: 60 seconds, as for PostgreSQL.</summary>
    public static readonly TimeSpan Timeout = TimeSpan.FromSeconds(60);

    public static async Task<(IConnectionMultiplexer Multiplexer, bool IsShared)> ConnectAsync(RedisClusteringOptions options, ILogger logger, TimeProvider time)
    {
        var multiplexer = await ConnectionMultiplexer.ConnectAsync(options.ConfigurationOptions!);
        var deadline = time.GetUtcNow() + Timeout;
        for (var logged = false; !multiplexer.IsConnected && time.GetUtcNow() < deadline;)
        {
            try
            {
                // Waits for a connection (the command's time-out at most), and says why there is none.
                await multiplexer.GetDatabase().PingAsync();
            }
            catch (Exception ex) when (ex is RedisConnectionException or RedisTimeoutException)
            {
                if (!logged)
                {
                    logged = true;
                    LogWaiting(logger, string.Join(", ", multiplexer.GetEndPoints().Select(e => e.ToString())), Timeout.TotalSeconds, ex.Message);
                }

                await Task.Delay(TimeSpan.FromMilliseconds(250), time);
            }
        }

        return (multiplexer, false);
    }

    [LoggerMessage(Level = LogLevel.Warning, Message = "Redis ({Endpoints}) is not reachable yet; this silo waits up to {Seconds} s for it before it joins the cluster: {Reason}")]
    private static partial void LogWaiting(ILogger logger, string endpoints, double seconds, string reason);
}
