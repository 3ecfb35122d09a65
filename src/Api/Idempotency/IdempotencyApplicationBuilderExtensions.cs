using Microsoft.Extensions.Options;

namespace OrleansIdempotency.AspNetCore;

/// <summary>Adds the idempotency middleware to the pipeline.</summary>
public static class IdempotencyApplicationBuilderExtensions
{
    private const string RegisteredKey = "OrleansIdempotency.MiddlewareRegistered";

    /// <summary>
    /// Makes endpoints with idempotency metadata (<see cref="IdempotentAttribute"/>, <c>.RequireIdempotency()</c>)
    /// idempotent. Call it after <c>UseAuthentication</c> and <c>UseAuthorization</c>, so that keys are scoped to the
    /// caller and refused requests claim nothing. Endpoints without metadata pass straight through.
    /// </summary>
    public static IApplicationBuilder UseIdempotency(this IApplicationBuilder app)
    {
        if (app.Properties.ContainsKey(RegisteredKey))
        {
            throw new InvalidOperationException(
                "UseIdempotency() was called twice. One idempotency middleware per pipeline: a second would claim every key twice.");
        }

        app.Properties[RegisteredKey] = true;
        return app.Use(next =>
        {
            // Run when the pipeline is built, every endpoint mapped by then: a policy that does not resolve stops the
            // start instead of failing each request to its endpoint.
            CheckPolicies(app.ApplicationServices);
            return ActivatorUtilities.CreateInstance<IdempotencyMiddleware>(app.ApplicationServices, next).InvokeAsync;
        });
    }

    private static void CheckPolicies(IServiceProvider services)
    {
        var options = services.GetRequiredService<IOptions<IdempotencyOptions>>().Value;
        foreach (var endpoint in services.GetService<EndpointDataSource>()?.Endpoints ?? [])
        {
            if (endpoint.Metadata.GetMetadata<IIdempotencyMetadata>() is { } metadata)
            {
                options.Check(metadata, $"endpoint '{endpoint.DisplayName}'");
            }
        }
    }
}
