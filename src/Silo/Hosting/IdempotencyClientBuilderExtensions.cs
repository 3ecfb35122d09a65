using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Configuration;
using Orleans.Configuration;

namespace OrleansIdempotency.Silo.Hosting;

/// <summary>Connects a process to an idempotency cluster as a client (<c>Orleans:Role=Client</c>).</summary>
public static class IdempotencyClientBuilderExtensions
{
    /// <summary>
    /// Finds the cluster's gateways through Redis when <c>ConnectionStrings:Redis</c> is set, else at
    /// <c>localhost:{Orleans:Endpoints:GatewayPort}</c>.
    /// </summary>
    public static IClientBuilder UseIdempotency(this IClientBuilder client, IConfiguration configuration)
    {
        var settings = IdempotencyClusterSettings.From(configuration);
        if (settings.Redis is { } redis)
        {
            client.UseRedisClustering(options => options.ConfigurationOptions = IdempotencySiloBuilderExtensions.RedisConfiguration(redis));
            client.Configure<ClusterOptions>(options =>
            {
                options.ClusterId = settings.ClusterId;
                options.ServiceId = settings.ServiceId;
            });
        }
        else
        {
            client.UseLocalhostClustering(settings.GatewayPort, serviceId: settings.ServiceId, clusterId: settings.ClusterId);
        }

        // A silo that froze (a long pause, a stalled VM) keeps its connections open: the client stops sending to its
        // gateway only when it reads the gateway list again and finds the silo gone. At Orleans' default of a minute,
        // half the calls of a client with two gateways failed for that long after the silo was declared dead.
        client.Configure<GatewayOptions>(options => options.GatewayListRefreshPeriod = GatewayListRefreshPeriod);

        // A client may start before the silos (docker-compose starts them together): keep trying for a while
        // instead of failing the host.
        var waiting = System.Diagnostics.Stopwatch.StartNew();
        client.UseConnectionRetryFilter(async (_, cancellationToken) =>
        {
            if (waiting.Elapsed >= ConnectTimeout)
            {
                return false;
            }

            await Task.Delay(TimeSpan.FromSeconds(1), cancellationToken);
            return true;
        });
        return client;
    }

    /// <summary>How often a client reads the cluster's gateways again: 5 seconds (a Redis read each time).</summary>
    public static readonly TimeSpan GatewayListRefreshPeriod = TimeSpan.FromSeconds(5);

    /// <summary>How long a starting client keeps trying to reach the cluster: 60 seconds.</summary>
    public static readonly TimeSpan ConnectTimeout = TimeSpan.FromSeconds(60);
}
