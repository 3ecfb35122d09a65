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
        return app.UseMiddleware<IdempotencyMiddleware>();
    }
}
