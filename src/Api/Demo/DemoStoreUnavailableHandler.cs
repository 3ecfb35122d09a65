using System.Data.Common;
using Microsoft.AspNetCore.Diagnostics;
using Microsoft.AspNetCore.Mvc;
using Npgsql;

namespace OrleansIdempotency.Api.Demo;

/// <summary>
/// Answers 503 with <c>Retry-After</c> when an action's own database fails transiently (PostgreSQL restarting, a
/// connection refused), as the layer does for its store. By the time this runs, the idempotency middleware has
/// released the key (the action threw; <see cref="AspNetCore.IdempotencyPolicy.ReleasesOnException"/>), so the retry it
/// invites runs the action again under the same key. (A connection lost after the action's commit was sent is
/// ambiguous; an endpoint whose side effect must never repeat keeps such keys in doubt through that policy.)
/// Other exceptions are left to the default handler (500 problem details).
/// </summary>
internal sealed class DemoStoreUnavailableHandler(IProblemDetailsService problems) : IExceptionHandler
{
    public async ValueTask<bool> TryHandleAsync(HttpContext context, Exception exception, CancellationToken cancellationToken)
    {
        if (!IsDatabaseUnreachable(exception))
        {
            return false;
        }

        context.Response.StatusCode = StatusCodes.Status503ServiceUnavailable;
        context.Response.Headers.RetryAfter = "1";
        return await problems.TryWriteAsync(new ProblemDetailsContext
        {
            HttpContext = context,
            Exception = exception,
            ProblemDetails = new ProblemDetails
            {
                Status = StatusCodes.Status503ServiceUnavailable,
                Title = "Demo database unavailable",
                Detail = "The action's database could not be reached. Retry with the same key.",
            },
        });
    }

    /// <summary>
    /// Npgsql failing to reach or losing the server, or the server refusing work while it shuts down or starts
    /// (class 08, 57P01-57P03); not an answer about the data (a unique violation, say), which would fail again.
    /// </summary>
    internal static bool IsDatabaseUnreachable(Exception exception) => exception switch
    {
        PostgresException postgres => postgres.SqlState.StartsWith("08", StringComparison.Ordinal)
            || postgres.SqlState is PostgresErrorCodes.AdminShutdown or PostgresErrorCodes.CrashShutdown or PostgresErrorCodes.CannotConnectNow
            || postgres.IsTransient,
        NpgsqlException => true,
        DbException { IsTransient: true } or TimeoutException => true,
        _ => false,
    };
}
