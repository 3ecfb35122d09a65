using System.Data.Common;
using Microsoft.AspNetCore.Diagnostics;
using Microsoft.AspNetCore.Mvc;
using Npgsql;

namespace OrleansIdempotency.Api.Demo;

/// <summary>
/// Answers 503 when an action's own database fails transiently (PostgreSQL restarting, a connection refused), as the
/// layer does for its store. By the time this runs, the idempotency middleware has released the key (the action
/// threw; <see cref="AspNetCore.IdempotencyPolicy.ReleasesOnException"/>), so the retry it invites with
/// <c>Retry-After</c> runs the action again under the same key. A connection lost after the write was sent
/// (<see cref="DemoWriteInDoubtException"/>) kept its key in doubt instead: no retry is invited, since it would be
/// answered 409 until an operator settles the key. Other exceptions are left to the default handler (500).
/// </summary>
internal sealed class DemoStoreUnavailableHandler(IProblemDetailsService problems) : IExceptionHandler
{
    public async ValueTask<bool> TryHandleAsync(HttpContext context, Exception exception, CancellationToken cancellationToken)
    {
        if (!IsDatabaseUnreachable(exception))
        {
            return false;
        }

        var inDoubt = exception is DemoWriteInDoubtException;
        context.Response.StatusCode = StatusCodes.Status503ServiceUnavailable;
        if (!inDoubt)
        {
            context.Response.Headers.RetryAfter = "1";
        }

        return await problems.TryWriteAsync(new ProblemDetailsContext
        {
            HttpContext = context,
            Exception = exception,
            ProblemDetails = new ProblemDetails
            {
                Status = StatusCodes.Status503ServiceUnavailable,
                Title = "Demo database unavailable",
                Detail = inDoubt
                    ? "The connection to the action's database broke after its write was sent, so whether it took effect is unknown. The key is kept: it is not run again, and an operator settles it."
                    : "The action's database could not be reached. Retry with the same key.",
            },
        });
    }

    /// <summary>
    /// Npgsql failing to reach or losing the server, or the server refusing work while it shuts down or starts
    /// (class 08, 57P01-57P03); not an answer about the data (a unique violation, say), which would fail again.
    /// </summary>
    internal static bool IsDatabaseUnreachable(Exception exception) => exception switch
    {
        DemoWriteInDoubtException => true,
        PostgresException postgres => postgres.SqlState.StartsWith("08", StringComparison.Ordinal)
            || postgres.SqlState is PostgresErrorCodes.AdminShutdown or PostgresErrorCodes.CrashShutdown or PostgresErrorCodes.CannotConnectNow
            || postgres.IsTransient,
        NpgsqlException => true,
        DbException { IsTransient: true } or TimeoutException => true,
        _ => false,
    };
}
