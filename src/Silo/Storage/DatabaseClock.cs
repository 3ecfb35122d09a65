using Microsoft.Extensions.Logging;
using Npgsql;

namespace OrleansIdempotency.Silo.Storage;

/// <summary>
/// PostgreSQL's clock as a silo sees it. Two clocks judge a key: its lease, by the clock of the silo that hosts its
/// grain; a claim's late landing, by PostgreSQL's (<c>OrleansStorage_PayloadValidNow</c>). A silo whose clock is a
/// lease behind PostgreSQL's writes claims that are already too late, so all its keys answer 503, and one a lease ahead
/// judges running actions' leases lapsed. Nothing looks like a clock in those failures, so a silo says so, at start and
/// at every purge.
/// </summary>
public static partial class DatabaseClock
{
    /// <summary>How far apart the clocks may be without a warning: NTP keeps them within milliseconds.</summary>
    public static readonly TimeSpan Tolerance = TimeSpan.FromSeconds(1);

    /// <summary>PostgreSQL's time, and how far it is ahead of <paramref name="time"/> (negative: behind).</summary>
    public static async Task<(DateTimeOffset Now, TimeSpan Offset)> ReadAsync(NpgsqlDataSource database, TimeProvider time, CancellationToken cancellationToken)
    {
        await using var connection = await database.OpenConnectionAsync(cancellationToken);
        await using var command = new NpgsqlCommand("SELECT clock_timestamp()", connection);
        var before = time.GetUtcNow();
        var now = new DateTimeOffset((DateTime)(await command.ExecuteScalarAsync(cancellationToken))!);
        var after = time.GetUtcNow();
        return (now, now - (before + ((after - before) / 2)));
    }

    /// <summary>Warns when <paramref name="offset"/> is beyond <see cref="Tolerance"/>.</summary>
    public static void Check(ILogger logger, TimeSpan offset)
    {
        if (offset.Duration() > Tolerance)
        {
            LogOffset(logger, offset.TotalSeconds);
        }
    }

    [LoggerMessage(Level = LogLevel.Warning, Message = "PostgreSQL's clock is {OffsetSeconds:0.0} s ahead of this silo's (negative: behind). " +
        "Leases are judged by silo clocks and late claims by PostgreSQL's: clocks a lease apart refuse every claim (503) or lapse running actions. Synchronise them (NTP).")]
    private static partial void LogOffset(ILogger logger, double offsetSeconds);
}
