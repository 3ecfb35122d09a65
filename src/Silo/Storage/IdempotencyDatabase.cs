using System.Data.Common;
using Npgsql;

namespace OrleansIdempotency.Silo.Storage;

/// <summary>The PostgreSQL database that holds idempotency records: one pooled data source per process.</summary>
public sealed class IdempotencyDatabase(string connectionString) : IAsyncDisposable
{
    /// <summary>
    /// Connect and command time-outs used unless the connection string sets its own. Npgsql's defaults (15 s and
    /// 30 s) would keep a grain waiting on a dead server long after its callers gave up (see
    /// <c>IIdempotencyGrain.CallTimeout</c>); a claim is one small statement, so seconds are plenty.
    /// </summary>
    public const int DefaultTimeoutSeconds = 5;

    /// <summary>Opens connections to the database.</summary>
    public NpgsqlDataSource DataSource { get; } = NpgsqlDataSource.Create(WithDefaults(connectionString));

    public ValueTask DisposeAsync() => DataSource.DisposeAsync();

    private static string WithDefaults(string connectionString)
    {
        // A plain DbConnectionStringBuilder holds only the keys that were written, so we can tell "unset" from "set".
        var given = new DbConnectionStringBuilder { ConnectionString = connectionString };
        var builder = new NpgsqlConnectionStringBuilder(connectionString);
        if (!given.ContainsKey("Timeout"))
        {
            builder.Timeout = DefaultTimeoutSeconds;
        }

        if (!given.ContainsKey("Command Timeout") && !given.ContainsKey("CommandTimeout"))
        {
            builder.CommandTimeout = DefaultTimeoutSeconds;
        }

        return builder.ConnectionString;
    }
}
