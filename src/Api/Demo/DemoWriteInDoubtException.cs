using Npgsql;
using OrleansIdempotency.AspNetCore;

namespace OrleansIdempotency.Api.Demo;

/// <summary>
/// The demo's write was sent and its connection broke before PostgreSQL answered: it may have committed. Its key is
/// kept in doubt (<see cref="DemoIdempotency.KeepingUnknownWritesInDoubt"/>), not released for a retry to write again.
/// </summary>
public sealed class DemoWriteInDoubtException(Exception inner)
    : Exception("The connection to the demo database broke after the write was sent: it may or may not have landed.", inner)
{
    /// <summary>
    /// True when <paramref name="exception"/>, thrown by a write already sent, leaves its outcome unknown: the
    /// connection failed (an I/O error, a time-out) rather than PostgreSQL answering, which rolls the write back.
    /// </summary>
    internal static bool LeavesTheWriteUnknown(Exception exception) =>
        exception is (NpgsqlException and not PostgresException) or TimeoutException or IOException;
}

/// <summary>The demo's idempotency policies.</summary>
public static class DemoIdempotency
{
    /// <summary>
    /// <paramref name="policy"/>, with a demo write of unknown outcome (<see cref="DemoWriteInDoubtException"/>)
    /// keeping its key in doubt, as the layer does for an action that cannot tell whether it took effect.
    /// </summary>
    public static IdempotencyPolicy KeepingUnknownWritesInDoubt(this IdempotencyPolicy policy)
    {
        var releases = policy.ReleasesOnException;
        return policy with { ReleasesOnException = (exception, context) => exception is not DemoWriteInDoubtException && releases(exception, context) };
    }
}
