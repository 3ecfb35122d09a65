using Microsoft.Extensions.Options;
using OrleansIdempotency.AspNetCore;
using Yarp.ReverseProxy.Configuration;

namespace OrleansIdempotency.Api.Gateway;

/// <summary>
/// Refuses a proxy configuration with a route whose idempotency metadata does not resolve to a valid policy, names a
/// scope header no request can carry, or names a scope header without asking for idempotency at all (a route meant to
/// be idempotent, forwarding every retry). YARP runs its filters on every load: at start a refusal stops the gateway,
/// on a reload YARP logs it and keeps the routes it had, instead of a route that would answer every request with an
/// error, or run every retry again.
/// </summary>
internal sealed class IdempotentRouteValidator(IOptions<IdempotencyOptions> options) : IProxyConfigFilter
{
    public ValueTask<RouteConfig> ConfigureRouteAsync(RouteConfig route, ClusterConfig? cluster, CancellationToken cancel)
    {
        var scopeHeader = route.Metadata?.GetValueOrDefault(GatewayExtensions.ScopeHeaderMetadata);
        if (!string.IsNullOrEmpty(scopeHeader))
        {
            if (route.Metadata!.GetValueOrDefault(GatewayExtensions.PolicyMetadata) is null)
            {
                throw new InvalidOperationException(
                    $"Route '{route.RouteId}' names {GatewayExtensions.ScopeHeaderMetadata} but no {GatewayExtensions.PolicyMetadata} policy, so it is not idempotent: " +
                    $"add \"{GatewayExtensions.PolicyMetadata}\": \"{GatewayExtensions.DefaultPolicyName}\" (or a policy's name), or remove the scope header.");
            }

            if (!HttpToken.IsFieldName(scopeHeader))
            {
                throw new InvalidOperationException(
                    $"Route '{route.RouteId}': {GatewayExtensions.ScopeHeaderMetadata} '{scopeHeader}' is not a header name ({HttpToken.Describe}), so no request could carry it.");
            }
        }

        if (GatewayExtensions.IdempotencyOf(route) is { } metadata)
        {
            options.Value.Check(metadata, $"route '{route.RouteId}'");
        }

        return ValueTask.FromResult(route);
    }

    public ValueTask<ClusterConfig> ConfigureClusterAsync(ClusterConfig cluster, CancellationToken cancel) =>
        ValueTask.FromResult(cluster);
}
