using System.Data.Common;
using Npgsql;

namespace OrleansIdempotency.Silo.Storage;

/// <summary>
/// The PostgreSQL database that holds idempotency records: per process, one data source for the grains' records
/// and a small one of its own for maintenance (the schema, the purge), so a long purge never queues record writes.
/// </summary>
public sealed class IdempotencyDatabase(string connectionString) : IAsyncDisposable
{
    /// <summary>
    /// Connect and command time-outs used unless the connection string sets its own (as are automatic statement
    /// preparation, no reset on close and multiplexing, below). Npgsql's defaults (15 s and
    /// 30 s) would keep a grain waiting on a dead server long after its callers gave up (see
    /// <c>IIdempotencyGrain.CallTimeout</c>); a claim is one small statement, so seconds are plenty.
    /// </summary>
    public const int DefaultTimeoutSeconds = 5;

    /// <summary>Connections per process when the connection string leaves multiplexing and the pool size unset.</summary>
    public const int MultiplexedConnections = 8;

    /// <summary>Opens connections for the grains' record reads and writes.</summary>
    public NpgsqlDataSource DataSource { get; } = NpgsqlDataSource.Create(ForRecords(connectionString));

    /// <summary>Opens connections for the schema installer and the purge: not multiplexed, at most two.</summary>
    public NpgsqlDataSource MaintenanceDataSource { get; } = NpgsqlDataSource.Create(ForMaintenance(connectionString));

    /// <summary>Opens a connection outside both pools: its session, and whatever it holds, ends when it is disposed.</summary>
    public async Task<NpgsqlConnection> OpenSessionAsync(CancellationToken cancellationToken)
    {
        var connection = new NpgsqlConnection(new NpgsqlConnectionStringBuilder(ForMaintenance(connectionString)) { Pooling = false }.ConnectionString);
        try
        {
            await connection.OpenAsync(cancellationToken);
            return connection;
        }
        catch
        {
            await connection.DisposeAsync();
            throw;
        }
    }

    public async ValueTask DisposeAsync()
    {
        await DataSource.DisposeAsync();
        await MaintenanceDataSource.DisposeAsync();
    }

    private static string ForRecords(string connectionString)
    {
        var given = Given(connectionString);
        var builder = new NpgsqlConnectionStringBuilder(connectionString);
        if (!given.Contains("timeout"))
        {
            builder.Timeout = DefaultTimeoutSeconds;
        }

        if (!given.Contains("commandtimeout"))
        {
            builder.CommandTimeout = DefaultTimeoutSeconds;
        }

        // The provider sends the same few statements all day: prepared once per connection, PostgreSQL skips parsing
        // and planning them. The pool is ours alone and nothing changes session state, so the reset Npgsql would
        // otherwise run on every return to the pool (SET SESSION AUTHORIZATION, RESET ALL, ...) is pure cost.
        if (!given.Contains("maxautoprepare"))
        {
            builder.MaxAutoPrepare = 16;
            builder.AutoPrepareMinUsages = 2;
        }

        if (!given.Contains("noresetonclose"))
        {
            builder.NoResetOnClose = true;
        }

        // Every grain write is one short statement of its own: multiplexed, many of them share a few connections
        // and go out in one network write, and PostgreSQL runs a few busy backends instead of one per concurrent
        // write (measured here: 8 connections cost PostgreSQL about 25 % less CPU per key than a pool of 50).
        // A write queued while PostgreSQL is unreachable may land late; a claim that lands after its lease ended is
        // refused by the write query itself (see PostgresSchema.sql).
        // Npgsql refuses to multiplex with several hosts, an application-level keepalive or no pool: such a string
        // keeps a connection per write, as it asks.
        var multiplexable = builder.Host?.Contains(',', StringComparison.Ordinal) != true && builder.KeepAlive == 0 && builder.Pooling;
        if (!given.Contains("multiplexing") && multiplexable)
        {
            builder.Multiplexing = true;
            if (!given.Contains("maxpoolsize") && !given.Contains("maximumpoolsize"))
            {
                builder.MaxPoolSize = Math.Max(MultiplexedConnections, builder.MinPoolSize);
            }
        }

        return builder.ConnectionString;
    }

    // Long commands (a purge batch, the schema), but a connect that gives up as soon as a record's does: the installer
    // and the standalone lock retry connecting within their own start-up deadline.
    private static string ForMaintenance(string connectionString)
    {
        var builder = new NpgsqlConnectionStringBuilder(connectionString)
        {
            Multiplexing = false,
            MaxPoolSize = 2,
            MinPoolSize = 0,
        };
        if (!Given(connectionString).Contains("timeout"))
        {
            builder.Timeout = DefaultTimeoutSeconds;
        }

        return builder.ConnectionString;
    }

    /// <summary>The keys the connection string sets, lower case and without spaces ("Maximum Pool Size" = "MaximumPoolSize").</summary>
    private static HashSet<string> Given(string connectionString)
    {
        // A plain DbConnectionStringBuilder holds only the keys that were written, so we can tell "unset" from "set".
        var given = new DbConnectionStringBuilder { ConnectionString = connectionString };
        return given.Keys.Cast<string>().Select(k => k.Replace(" ", "", StringComparison.Ordinal).ToLowerInvariant()).ToHashSet();
    }
}
