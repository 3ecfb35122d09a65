using Microsoft.AspNetCore.Diagnostics;
using Microsoft.Net.Http.Headers;
using OrleansIdempotency.AspNetCore;
using Yarp.ReverseProxy.Configuration;
using Yarp.ReverseProxy.Forwarder;
using Yarp.ReverseProxy.Transforms;

namespace OrleansIdempotency.Api.Gateway;

/// <summary>
/// The gateway (DESIGN §5): this API as a reverse proxy (YARP, configured by its own <c>ReverseProxy</c> section)
/// in front of an API written in any language, idempotent on the routes that ask for it in their metadata:
/// <c>"Idempotency": "Default"</c> for the default policy, or the name of a policy.
/// </summary>
/// <remarks>
/// Keys on a gateway route are scoped by a digest of the caller's <c>Authorization</c> header (the backend, not
/// the gateway, knows who the caller is), or of the header the route names in <c>"IdempotencyScopeHeader"</c>.
/// A request without that header is refused (401 <c>scope-required</c>): callers the gateway cannot tell apart must
/// not share keys. A caller whose credentials change between attempts (a refreshed token) starts a new scope: its
/// retry runs again. The digest is not salted: low-entropy credentials (Basic passwords) are better scoped by
/// another header.
/// </remarks>
public static class GatewayExtensions
{
    /// <summary>YARP's configuration section.</summary>
    public const string Section = "ReverseProxy";

    /// <summary>The route metadata that makes a route idempotent; its value names the policy.</summary>
    public const string PolicyMetadata = "Idempotency";

    /// <summary>The route metadata that names the header whose digest scopes the route's keys.</summary>
    public const string ScopeHeaderMetadata = "IdempotencyScopeHeader";

    /// <summary>The policy name that stands for the default policy.</summary>
    public const string DefaultPolicyName = "Default";

    /// <summary>The header whose digest scopes keys when the route names none.</summary>
    public const string DefaultScopeHeader = "Authorization";

    /// <summary>Adds the reverse proxy when the configuration has a <c>ReverseProxy</c> section; true if it did.</summary>
    public static bool AddGateway(this WebApplicationBuilder builder)
    {
        var section = builder.Configuration.GetSection(Section);
        if (!section.Exists())
        {
            return false;
        }

        builder.Services.AddReverseProxy().LoadFromConfig(section).AddConfigFilter<IdempotentRouteValidator>()
            .AddTransforms(static transforms =>
            {
                if (IdempotencyOf(transforms.Route) is not null)
                {
                    transforms.AddRequestTransform(SendOnceAsync);
                }
            });
        return true;
    }

    /// <summary>
    /// .NET's HTTP client sends a request again, on a new connection, when the backend closes one without a byte of
    /// answer, unless the request's content had begun to go out: a backend that ran the request and died would run
    /// it up to three more times. So a request without a body (no <c>Content-Length</c>, or HTTP/2 without data)
    /// goes with an empty one, and none waits for 100 Continue (the layer has the whole body already).
    /// </summary>
    private static ValueTask SendOnceAsync(RequestTransformContext context)
    {
        // Only a request the layer runs under a claim: a GET passing through keeps its form, and .NET's resend of it.
        if (!IdempotencyMiddleware.IsRunning(context.HttpContext))
        {
            return ValueTask.CompletedTask;
        }

        if (context.ProxyRequest.Content is null)
        {
            // YARP's own empty content, made to carry this header: it refuses content replaced by a transform.
            RequestTransform.AddHeader(context, HeaderNames.ContentLength, "0");
        }

        context.ProxyRequest.Headers.ExpectContinue = false;
        return ValueTask.CompletedTask;
    }

    /// <summary>
    /// Maps the proxy's routes, each idempotent as its metadata asks. A route naming a policy that does not exist
    /// stops the application here, or is refused on a reload (<see cref="IdempotentRouteValidator"/>), rather than
    /// failing its requests.
    /// </summary>
    public static void MapGateway(this WebApplication app) =>
        app.MapReverseProxy(static proxy =>
        {
            proxy.Use(PassTheBackendsAnswerAsItIs);
            proxy.Use(LeaveInDoubtWhenTheBackendMayHaveRunAsync);
            // YARP's default steps, which a pipeline of one's own must name.
            proxy.UseSessionAffinity();
            proxy.UseLoadBalancing();
            proxy.UsePassiveHealthChecks();
        }).ConfigureEndpoints(static (endpoint, route) =>
        {
            if (IdempotencyOf(route) is { } metadata)
            {
                endpoint.WithMetadata(metadata);
            }
        });

    // The host's status code pages would give a backend's empty 404 a body of the host's own.
    private static Task PassTheBackendsAnswerAsItIs(HttpContext context, Func<Task> next)
    {
        if (context.Features.Get<IStatusCodePagesFeature>() is { } pages)
        {
            pages.Enabled = false;
        }

        return next();
    }

    /// <summary>
    /// The proxy's own 502 or 504 is no answer of the backend's: when the request may have reached it (it timed out,
    /// or the connection broke after the request went out), the backend may have run, and a released key would run
    /// it again on the retry. The key is left to its lease instead; a failure before anything was sent releases it.
    /// A failure reported once the backend's answer was passed on whole is the request body's alone (an HTTP/2
    /// backend that answered before reading it all ends the stream, and the rest fails to go out): the answer stands.
    /// </summary>
    private static async Task LeaveInDoubtWhenTheBackendMayHaveRunAsync(HttpContext context, Func<Task> next)
    {
        await next();
        if (context.GetForwarderErrorFeature() is { } failure && MayHaveReachedTheBackend(failure) && !PassedOnWhole(context, failure))
        {
            IdempotencyMiddleware.LeaveInDoubt(context);
        }
    }

    // A request body's failure after an answer had begun: YARP aborts that answer when the failure cut it short, and
    // reports the failure with the answer untouched when it came once the answer was passed on whole. Before any of an
    // answer was passed on, YARP answers such a failure with its own status, so an answer without a body, though whole,
    // cannot be told from that, and is left in doubt. (A trailers transform would mark the end of a whole answer, but
    // YARP runs those only for clients that take trailers.)
    private static bool PassedOnWhole(HttpContext context, IForwarderErrorFeature failure) =>
        failure.Error is ForwarderError.RequestBodyClient or ForwarderError.RequestBodyDestination or ForwarderError.RequestBodyCanceled
        && context.Response.HasStarted && !IdempotencyMiddleware.AbortedItsResponse(context);

    internal static bool MayHaveReachedTheBackend(IForwarderErrorFeature failure) => failure.Error switch
    {
        ForwarderError.None or ForwarderError.NoAvailableDestinations or ForwarderError.RequestCreation => false,
        ForwarderError.Request => failure.Exception is not HttpRequestException
        {
            HttpRequestError: HttpRequestError.ConnectionError or HttpRequestError.NameResolutionError or HttpRequestError.SecureConnectionError,
        },
        // The handler's connect time-out (a TimeoutException inside), not the activity time-out: never connected.
        ForwarderError.RequestTimedOut => failure.Exception is not OperationCanceledException { InnerException: TimeoutException },
        _ => true,
    };

    /// <summary>The idempotency a route's metadata asks for, or null if it asks for none.</summary>
    internal static IdempotencyMetadata? IdempotencyOf(RouteConfig route) =>
        route.Metadata?.GetValueOrDefault(PolicyMetadata) is { } policy
            ? Metadata(policy, route.Metadata.GetValueOrDefault(ScopeHeaderMetadata), RouteOf(route))
            : null;

    // A route matched by host or header may share its path with another: its id tells it apart in the fingerprint.
    // Others keep the framing of a path alone, which their stored fingerprints were made with.
    private static string? RouteOf(RouteConfig route) =>
        route.Match.Hosts is { Count: > 0 } || route.Match.Headers is { Count: > 0 } ? "gateway route " + route.RouteId : null;

    private static IdempotencyMetadata Metadata(string policy, string? scopeHeader, string? route)
    {
        var scope = IdempotencyScope.HeaderDigest(string.IsNullOrEmpty(scopeHeader) ? DefaultScopeHeader : scopeHeader);
        return new IdempotencyMetadata(
            string.Equals(policy, DefaultPolicyName, StringComparison.OrdinalIgnoreCase) ? null : policy,
            p => p with { Scope = scope, AllowAnonymous = false },
            route);
    }
}
