using Microsoft.Extensions.Options;
using OrleansIdempotency.AspNetCore;
using Yarp.ReverseProxy.Configuration;

namespace OrleansIdempotency.Api.Gateway;

/// <summary>
/// Refuses a proxy configuration with a route whose idempotency metadata does not resolve to a valid policy. YARP
/// runs its filters on every load: at start a refusal stops the gateway, on a reload YARP logs it and keeps the
/// routes it had, instead of a route that would answer every request with an error.
/// </summary>
internal sealed class IdempotentRouteValidator(IOptions<IdempotencyOptions> options) : IProxyConfigFilter
{
    public ValueTask<RouteConfig> ConfigureRouteAsync(RouteConfig route, ClusterConfig? cluster, CancellationToken cancel)
    {
        if (GatewayExtensions.IdempotencyOf(route) is { } metadata)
        {
            options.Value.Check(metadata, $"route '{route.RouteId}'");
        }

        return ValueTask.FromResult(route);
    }

    public ValueTask<ClusterConfig> ConfigureClusterAsync(ClusterConfig cluster, CancellationToken cancel) =>
        ValueTask.FromResult(cluster);
}
