using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Options;

namespace OrleansIdempotency.Silo.Storage;

/// <summary>
/// Deletes records past their retention, in batches, so that storage stays bounded (DESIGN §4). Every silo runs
/// one; they may overlap harmlessly. A grain that still holds a purged record in memory finds the row gone at its
/// next write (the ETag check fails), re-reads, and sees the key as absent, which is what an expired key is.
/// </summary>
public sealed partial class ExpiredRecordPurger(
    IdempotencyDatabase database,
    IOptions<IdempotencyStorageOptions> options,
    TimeProvider time,
    ILogger<ExpiredRecordPurger> logger) : BackgroundService
{
    private const string DeleteBatch = """
        DELETE FROM OrleansStorage
        WHERE ctid = ANY (ARRAY(SELECT ctid FROM OrleansStorage WHERE ExpiresAt <= @cutoff LIMIT @batch))
          AND ExpiresAt <= @cutoff
        """;

    // A batch's own bound, not the connection string's command time-out, which is set for the records' short writes: a
    // batch of large records (TOAST) outlasting that would roll back in every round, and storage grow without end.
    private const int BatchTimeoutSeconds = 300;

    /// <summary>Deletes every record that expired at or before <paramref name="cutoff"/>.</summary>
    /// <returns>The number of records deleted.</returns>
    public async Task<long> PurgeAsync(DateTimeOffset cutoff, CancellationToken cancellationToken)
    {
        var batch = options.Value.PurgeBatchSize;
        long total = 0;
        int deleted;
        do
        {
            await using var command = database.MaintenanceDataSource.CreateCommand(DeleteBatch);
            command.CommandTimeout = BatchTimeoutSeconds;
            command.Parameters.AddWithValue("cutoff", cutoff);
            command.Parameters.AddWithValue("batch", batch);
            deleted = await command.ExecuteNonQueryAsync(cancellationToken);
            total += deleted;
        }
        while (deleted == batch);

        return total;
    }

    /// <summary>
    /// How long after its expiry by PostgreSQL's clock a record is kept. An expiry is written by the clock of the silo
    /// that completed the key; a silo behind PostgreSQL's clock still replays the key for that long, and would run it
    /// again on a row purged early. Storage only has to stay bounded: purging late costs a few minutes of rows.
    /// </summary>
    public static readonly TimeSpan Grace = TimeSpan.FromMinutes(5);

    /// <summary>
    /// One round of the purge: every record expired <see cref="Grace"/> ago by PostgreSQL's clock, the clock that also
    /// refuses late claims, so that what is purged and what may still land are judged by one clock, whatever the silos'
    /// clocks say within that grace.
    /// </summary>
    public async Task PurgeExpiredAsync(CancellationToken cancellationToken)
    {
        var (now, offset) = await DatabaseClock.ReadAsync(database.MaintenanceDataSource, time, cancellationToken);
        DatabaseClock.Check(logger, offset);
        var deleted = await PurgeAsync(now - Grace, cancellationToken);
        if (deleted > 0)
        {
            LogPurged(logger, deleted);
        }
    }

    /// <summary>
    /// How long the purge may keep failing before each failed round is an Error: storage then grows with every key
    /// stored, which no retry heals if what fails is a permission or a schema (an outage ends by itself).
    /// </summary>
    public static readonly TimeSpan FailingTooLong = TimeSpan.FromHours(1);

    protected override async Task ExecuteAsync(CancellationToken stoppingToken)
    {
        using var timer = new PeriodicTimer(options.Value.PurgeInterval, time);
        DateTimeOffset? failingSince = null;
        var failedRounds = 0;
        while (await NextTickAsync(timer, stoppingToken))
        {
            try
            {
                await PurgeExpiredAsync(stoppingToken);
            }
            catch (Exception ex) when (!stoppingToken.IsCancellationRequested)
            {
                // The next tick tries again; an outage delays purging, never correctness. Whatever failed, the loop goes
                // on: a background service that throws stops its host, and this one would take the silo down with it.
                failingSince ??= time.GetUtcNow();
                failedRounds++;
                LogFailedRound(ex, failedRounds, failingSince.Value);
                continue;
            }

            if (failedRounds > 0)
            {
                LogRecovered(failedRounds);
            }

            (failingSince, failedRounds) = (null, 0);
        }
    }

    // A log that cannot be written stops neither the purge nor the silo, nor counts as a round that failed.
    private void LogFailedRound(Exception exception, int failedRounds, DateTimeOffset failingSince)
    {
        try
        {
            if (time.GetUtcNow() - failingSince >= FailingTooLong)
            {
                LogPurgeFailing(logger, exception, failedRounds, failingSince);
            }
            else
            {
                LogPurgeFailed(logger, exception);
            }
        }
        catch (Exception)
        {
            // Unlogged.
        }
    }

    private void LogRecovered(int failedRounds)
    {
        try
        {
            LogPurgeRecovered(logger, failedRounds);
        }
        catch (Exception)
        {
            // Unlogged.
        }
    }

    private static async Task<bool> NextTickAsync(PeriodicTimer timer, CancellationToken stoppingToken)
    {
        try
        {
            return await timer.WaitForNextTickAsync(stoppingToken);
        }
        catch (OperationCanceledException)
        {
            return false;
        }
    }

    [LoggerMessage(Level = LogLevel.Information, Message = "Purged {Count} expired idempotency records.")]
    private static partial void LogPurged(ILogger logger, long count);

    [LoggerMessage(Level = LogLevel.Warning, Message = "Purging expired idempotency records failed; will retry.")]
    private static partial void LogPurgeFailed(ILogger logger, Exception exception);

    [LoggerMessage(Level = LogLevel.Error, Message = "Purging expired idempotency records has failed {Rounds} rounds in a row, since {Since:o}: storage grows with every key until a round succeeds.")]
    private static partial void LogPurgeFailing(ILogger logger, Exception exception, int rounds, DateTimeOffset since);

    [LoggerMessage(Level = LogLevel.Information, Message = "Purging expired idempotency records succeeded again, after {Rounds} failed rounds.")]
    private static partial void LogPurgeRecovered(ILogger logger, int rounds);
}
