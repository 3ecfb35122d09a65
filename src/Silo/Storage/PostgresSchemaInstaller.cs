using System.Globalization;
using System.Text.RegularExpressions;
using Microsoft.Extensions.Logging;
using Npgsql;
using Orleans.Runtime;

namespace OrleansIdempotency.Silo.Storage;

/// <summary>Applies <c>PostgresSchema.sql</c>: on every start, by every silo, safely at the same time.</summary>
/// <remarks>It runs in the silo's storage stage, before the grain storage provider reads its queries.</remarks>
public sealed partial class PostgresSchemaInstaller(IdempotencyDatabase database, TimeProvider time, ILogger<PostgresSchemaInstaller> logger)
    : ILifecycleParticipant<ISiloLifecycle>
{
    // Any constant shared by every process that installs the schema: silos starting together take turns.
    internal const long AdvisoryLockKey = 0x4F49_6465_6D70; // "OIdemp"

    // Written into our queries' text, so a database set up by anyone else's scripts is recognised, not overwritten.
    private const string Marker = "OrleansIdempotency";

    // Where the script gives the write query's text, whose start names the schema's version.
    private const string WriteQueryRow = "('WriteToStorageKey', '";

    private static readonly string Script = ReadScript();

    /// <summary>
    /// The version of the schema this silo installs, as its write query's text says (<c>/* OrleansIdempotency schema
    /// N */</c>). One installed before versions were has the marker alone: version 1.
    /// </summary>
    public static int Version { get; } =
        Script.IndexOf(WriteQueryRow, StringComparison.Ordinal) is var row and >= 0 && VersionOf(Script[(row + WriteQueryRow.Length)..]) is { } version
            ? version
            : throw new InvalidOperationException("PostgresSchema.sql's write query names no schema version.");

    /// <summary>How long a starting silo waits for PostgreSQL to accept connections. The default is 60 seconds.</summary>
    public TimeSpan StartupTimeout { get; init; } = TimeSpan.FromSeconds(60);

    public void Participate(ISiloLifecycle lifecycle) =>
        lifecycle.Subscribe(nameof(PostgresSchemaInstaller), ServiceLifecycleStage.RuntimeStorageServices, InstallAsync);

    /// <summary>Applies the schema, retrying while PostgreSQL is not yet reachable.</summary>
    public async Task InstallAsync(CancellationToken cancellationToken)
    {
        var deadline = time.GetUtcNow() + StartupTimeout;
        for (var attempt = 1; ; attempt++)
        {
            try
            {
                if (await ApplyAsync(cancellationToken) is { } newer)
                {
                    LogNewerKept(logger, newer, Version);
                }
                else
                {
                    LogInstalled(logger);
                }

                DatabaseClock.Check(logger, (await DatabaseClock.ReadAsync(database.MaintenanceDataSource, time, cancellationToken)).Offset);
                await CheckCommitsDurableAsync(cancellationToken);
                return;
            }
            catch (NpgsqlException ex) when (ex.IsTransient && time.GetUtcNow() < deadline)
            {
                LogWaiting(logger, attempt, ex.Message);
                await Task.Delay(TimeSpan.FromSeconds(1), time, cancellationToken);
            }
        }
    }

    // Null when applied; else the newer version found installed, and left as it is.
    private async Task<int?> ApplyAsync(CancellationToken cancellationToken)
    {
        await using var connection = await database.MaintenanceDataSource.OpenConnectionAsync(cancellationToken);
        await using var transaction = await connection.BeginTransactionAsync(cancellationToken);
        await using (var command = new NpgsqlCommand("SELECT pg_advisory_xact_lock(@key)", connection, transaction))
        {
            command.Parameters.AddWithValue("key", AdvisoryLockKey);
            await command.ExecuteNonQueryAsync(cancellationToken);
        }

        await using (var command = new NpgsqlCommand("SELECT to_regclass('orleansquery') IS NOT NULL", connection, transaction))
        {
            if ((bool)(await command.ExecuteScalarAsync(cancellationToken))!)
            {
                command.CommandText = "SELECT QueryText FROM OrleansQuery WHERE QueryKey = 'WriteToStorageKey'";
                if (await command.ExecuteScalarAsync(cancellationToken) is string existing)
                {
                    if (!existing.Contains(Marker, StringComparison.Ordinal))
                    {
                        throw new InvalidOperationException(
                            "This PostgreSQL database already holds another application's Orleans storage queries (OrleansQuery). " +
                            "The queries are global to a database, so OrleansIdempotency needs a database of its own: point ConnectionStrings__Postgres at one.");
                    }

                    if ((VersionOf(existing) ?? 1) is var installed && installed > Version)
                    {
                        return installed;
                    }
                }
            }
        }

        await using (var command = new NpgsqlCommand(Script, connection, transaction))
        {
            await command.ExecuteNonQueryAsync(cancellationToken);
        }

        await transaction.CommitAsync(cancellationToken);
        return null;
    }

    // A claim counts once PostgreSQL acknowledges its commit. With synchronous_commit off (for the database, the role
    // or in the connection string's options) a crash of PostgreSQL can take back claims it acknowledged, with fsync off
    // a crash of its machine can, and with it local beside a synchronous standby the standby promoted can lack them:
    // their keys' retries would run again. Asked on the records' own connections.
    private async Task CheckCommitsDurableAsync(CancellationToken cancellationToken)
    {
        await using var command = database.DataSource.CreateCommand(
            // A standby is a physical walsender streaming: one outside any database (a logical one, change-data capture,
            // is in one). A user without pg_read_all_stats sees such a walsender with neither its state nor sync_state.
            "WITH Standbys AS (SELECT r.state, r.sync_state FROM pg_stat_replication r JOIN pg_stat_activity a ON a.pid = r.pid " +
            "WHERE a.datname IS NULL AND (r.state = 'streaming' OR r.state IS NULL)) " +
            "SELECT current_setting('synchronous_commit') = 'off' OR NOT current_setting('fsync')::boolean " +
            "OR (current_setting('synchronous_commit') = 'local' AND current_setting('synchronous_standby_names') <> ''), " +
            "EXISTS (SELECT 1 FROM Standbys WHERE sync_state = 'async') AND NOT EXISTS (SELECT 1 FROM Standbys WHERE sync_state IN ('sync', 'quorum')), " +
            "EXISTS (SELECT 1 FROM Standbys WHERE state IS NULL)");
        await using var reader = await command.ExecuteReaderAsync(cancellationToken);
        await reader.ReadAsync(cancellationToken);
        if (reader.GetBoolean(0))
        {
            LogCommitsNotDurable(logger);
        }

        if (reader.GetBoolean(1))
        {
            LogStandbyAsynchronous(logger);
        }
        else if (reader.GetBoolean(2))
        {
            LogStandbysUnknown(logger);
        }
    }

    private static int? VersionOf(string queryText) =>
        VersionMark().Match(queryText) is { Success: true } match ? int.Parse(match.Groups[1].ValueSpan, CultureInfo.InvariantCulture) : null;

    // The first mark in the text: the write query's own (the script is read from that query's row on).
    [GeneratedRegex(@"/\* OrleansIdempotency schema ([0-9]{1,9}) \*/")]
    private static partial Regex VersionMark();

    private static string ReadScript()
    {
        using var stream = typeof(PostgresSchemaInstaller).Assembly.GetManifestResourceStream("PostgresSchema.sql")
            ?? throw new InvalidOperationException("PostgresSchema.sql is not embedded in the silo assembly.");
        using var reader = new StreamReader(stream);
        return reader.ReadToEnd();
    }

    [LoggerMessage(Level = LogLevel.Information, Message = "Idempotency schema applied to PostgreSQL.")]
    private static partial void LogInstalled(ILogger logger);

    [LoggerMessage(Level = LogLevel.Warning, Message = "PostgreSQL holds the idempotency schema of a newer version ({Installed}) than this silo's ({Own}); it is left as it is. Upgrade this silo.")]
    private static partial void LogNewerKept(ILogger logger, int installed, int own);

    [LoggerMessage(Level = LogLevel.Warning, Message = "PostgreSQL acknowledges idempotency records before they are durable (synchronous_commit " +
        "off, or local beside a synchronous standby; or fsync off): a crash or a failover can lose claims it acknowledged, and their keys' retries would run again.")]
    private static partial void LogCommitsNotDurable(ILogger logger);

    [LoggerMessage(Level = LogLevel.Warning, Message = "PostgreSQL replicates idempotency records to a standby asynchronously: promoted, it may lack " +
        "claims and completions the primary acknowledged, and their keys' retries would run again. Make the replication synchronous " +
        "(synchronous_standby_names) where a standby may be promoted.")]
    private static partial void LogStandbyAsynchronous(ILogger logger);

    [LoggerMessage(Level = LogLevel.Information, Message = "PostgreSQL streams to a standby, and this silo's user may not read whether " +
        "synchronously (pg_read_all_stats): a standby that may be promoted must be synchronous, or acknowledged claims can be lost.")]
    private static partial void LogStandbysUnknown(ILogger logger);

    [LoggerMessage(Level = LogLevel.Warning, Message = "PostgreSQL is not reachable yet (attempt {Attempt}): {Reason}")]
    private static partial void LogWaiting(ILogger logger, int attempt, string reason);
}
