using System.Data;
using Microsoft.Extensions.Logging;
using Npgsql;
using Orleans.Runtime;

namespace OrleansIdempotency.Silo.Storage;

/// <summary>
/// Without Redis a silo is a cluster of its own, so two such silos on one database, or one beside a Redis cluster,
/// would each activate the same keys for good, not just while membership changes: every write stays fenced (ETags),
/// but each answers from its own copy, read again at most once a second, and each keeps the other's keys' activations
/// and waiters apart. So every silo on PostgreSQL holds a lock in PostgreSQL, per service, for as long as it runs:
/// the silos of a Redis cluster share it, a silo without Redis holds it alone. A silo that cannot take it waits (an
/// overlapping restart), then refuses to start, naming the cause.
/// </summary>
/// <remarks>
/// PostgreSQL drops the lock with the session: when the process exits or is killed, when its host vanishes (within a
/// minute: the session is probed), or when the connection is lost, as in a PostgreSQL restart. A running silo checks
/// its session every <see cref="CheckInterval"/> and takes the lock again in a new one; should a silo that forms another cluster
/// have taken it meanwhile, it says so, loudly, since two clusters then serve the service. Two Redis clusters of one
/// service (two ClusterIds at once) both share it, and are not detected: run one ClusterId per service at a time.
/// </remarks>
public sealed partial class ServiceLock(IdempotencyDatabase database, string serviceId, bool clustered, TimeProvider time, ILogger<ServiceLock> logger)
    : ILifecycleParticipant<ISiloLifecycle>, IAsyncDisposable
{
    // The two-key advisory lock space, apart from the schema installer's one-key lock: "OIde", then the service.
    private const int LockSpace = 0x4F49_6465;

    private readonly CancellationTokenSource stopping = new();
    private NpgsqlConnection? held;
    private int heldBy;
    private Task keeping = Task.CompletedTask;
    private int disposed;

    /// <summary>How long a starting silo waits for the silos of another cluster serving its service to stop. The default is 60 seconds.</summary>
    public TimeSpan StartupTimeout { get; init; } = TimeSpan.FromSeconds(60);

    /// <summary>How often a running silo checks that its lock's session lives. The default is 10 seconds.</summary>
    public TimeSpan CheckInterval { get; init; } = TimeSpan.FromSeconds(10);

    // The stage after the schema installer's: PostgreSQL has been waited for by then, and grains are not yet served.
    public void Participate(ISiloLifecycle lifecycle) =>
        lifecycle.Subscribe(nameof(ServiceLock), ServiceLifecycleStage.RuntimeGrainServices, AcquireAsync, _ => ReleaseAsync());

    /// <summary>
    /// Takes the lock, waiting up to <see cref="StartupTimeout"/> for the silo that holds it to stop, and through a lost
    /// session (PostgreSQL restarting meanwhile); then keeps it.
    /// </summary>
    public async Task AcquireAsync(CancellationToken cancellationToken)
    {
        var deadline = time.GetUtcNow() + StartupTimeout;
        NpgsqlConnection? connection = null;
        var refusedBefore = false;
        try
        {
            while (true)
            {
                try
                {
                    connection ??= await database.OpenSessionAsync(cancellationToken);
                    if (await TryLockAsync(connection, cancellationToken))
                    {
                        break;
                    }
                }
                catch (NpgsqlException ex) when (time.GetUtcNow() < deadline && (ex.IsTransient || connection is not { State: ConnectionState.Open }))
                {
                    // The session was lost with whatever it held: the next one asks again. (Any other failure is the start's.)
                    LogSessionLost(logger, serviceId, ex.Message);
                    if (connection is not null)
                    {
                        await connection.DisposeAsync();
                        connection = null;
                    }

                    await Task.Delay(TimeSpan.FromSeconds(1), time, cancellationToken);
                    continue;
                }

                if (time.GetUtcNow() >= deadline)
                {
                    throw new InvalidOperationException(clustered
                        ? $"A silo without Redis serves '{serviceId}' from this PostgreSQL database as a cluster of its own, and this silo's " +
                          "Redis cluster would be a second. Silos that share a database must form one cluster: set ConnectionStrings__Redis " +
                          "on every one of them (or give this one a database of its own)."
                        : $"Other silos serve '{serviceId}' from this PostgreSQL database (one without Redis, or a Redis cluster), and this one, " +
                          "without Redis, would be a cluster of its own. Silos that share a database must form one cluster: set " +
                          "ConnectionStrings__Redis on every one of them (or give this one a database of its own).");
                }

                if (!refusedBefore)
                {
                    refusedBefore = true;
                    LogWaiting(logger, serviceId);
                }

                await Task.Delay(TimeSpan.FromSeconds(1), time, cancellationToken);
            }
        }
        catch
        {
            if (connection is not null)
            {
                await connection.DisposeAsync();
            }

            throw;
        }

        held = connection;
        heldBy = connection.ProcessID;
        keeping = KeepAsync(stopping.Token);
    }

    /// <summary>Lets another cluster's silos serve the service, once no silo of this one holds the lock.</summary>
    public async Task ReleaseAsync()
    {
        if (Volatile.Read(ref disposed) == 0)
        {
            await stopping.CancelAsync();
        }

        try
        {
            await keeping;
        }
        finally
        {
            if (Interlocked.Exchange(ref held, null) is { } connection)
            {
                // Ending the session drops its advisory locks.
                await connection.DisposeAsync();
            }
        }
    }

    public async ValueTask DisposeAsync()
    {
        await ReleaseAsync();
        if (Interlocked.Exchange(ref disposed, 1) == 0)
        {
            stopping.Dispose();
        }
    }

    private async Task<bool> TryLockAsync(NpgsqlConnection connection, CancellationToken cancellationToken)
    {
        // A session whose host vanished (no reset sent) would hold the lock until the server's TCP keepalive gives up,
        // two hours by default: the server probes this one itself, and drops it within a minute.
        await using var command = new NpgsqlCommand(
            "SET tcp_keepalives_idle = 15; SET tcp_keepalives_interval = 5; SET tcp_keepalives_count = 3; " +
            (clustered ? "SELECT pg_try_advisory_lock_shared(@space, hashtext(@service))" : "SELECT pg_try_advisory_lock(@space, hashtext(@service))"),
            connection);
        command.Parameters.AddWithValue("space", LockSpace);
        command.Parameters.AddWithValue("service", serviceId);
        return (bool)(await command.ExecuteScalarAsync(cancellationToken))!;
    }

    // Checks the session every CheckInterval; a lost one is replaced, and the lock taken again in it, until released.
    private async Task KeepAsync(CancellationToken stop)
    {
        using var timer = new PeriodicTimer(CheckInterval, time);
        var takenByAnother = false;
        try
        {
            while (await timer.WaitForNextTickAsync(stop))
            {
                if (held is { } session && await AliveAsync(session, stop))
                {
                    takenByAnother = false;
                    continue;
                }

                NpgsqlConnection? fresh = null;
                try
                {
                    fresh = await database.OpenSessionAsync(stop);
                    if (await TryLockAsync(fresh, stop))
                    {
                        if (Interlocked.Exchange(ref held, fresh) is { } lost)
                        {
                            await lost.DisposeAsync();
                        }

                        heldBy = fresh.ProcessID;
                        fresh = null;
                        LogRetaken(logger, serviceId);
                        takenByAnother = false;
                    }
                    else if (!takenByAnother && await OtherHolderAsync(fresh, stop) is { } holder)
                    {
                        // Not our old session, which the server may not have seen die yet (it then holds the lock on).
                        LogTakenByAnother(logger, serviceId, holder.Pid, holder.Client);
                        takenByAnother = true;
                    }
                }
                catch (Exception ex) when (!stop.IsCancellationRequested)
                {
                    // PostgreSQL is still away, or the check failed: the next one tries again.
                    LogCheckFailed(logger, serviceId, ex.GetType().Name);
                }
                finally
                {
                    // A session not kept (refused the lock, failed, or released meanwhile) ends here, with any lock it took.
                    if (fresh is not null)
                    {
                        await fresh.DisposeAsync();
                    }
                }
            }
        }
        catch (Exception) when (stop.IsCancellationRequested)
        {
            // Released: whatever a check was doing ends here (a dropped connection throws rather than cancels).
        }
    }

    // A session holding the lock in the way that keeps this silo out: not its own old one (the server may not have seen it
    // die yet), and, for a silo of a Redis cluster, one holding it alone (the cluster's other silos share it).
    private async Task<(int Pid, string Client)?> OtherHolderAsync(NpgsqlConnection connection, CancellationToken stop)
    {
        await using var command = new NpgsqlCommand(
            "SELECT l.pid, coalesce(host(a.client_addr), 'a local socket') FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid " +
            "WHERE l.locktype = 'advisory' AND l.granted AND l.classid = @space AND l.objid = hashtext(@service)::oid AND l.objsubid = 2 " +
            "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) AND l.pid <> @mine " +
            "AND (NOT @clustered OR l.mode = 'ExclusiveLock')", connection);
        command.Parameters.AddWithValue("space", LockSpace);
        command.Parameters.AddWithValue("service", serviceId);
        command.Parameters.AddWithValue("mine", heldBy);
        command.Parameters.AddWithValue("clustered", clustered);
        await using var reader = await command.ExecuteReaderAsync(stop);
        return await reader.ReadAsync(stop) ? (reader.GetInt32(0), reader.GetString(1)) : null;
    }

    private static async Task<bool> AliveAsync(NpgsqlConnection session, CancellationToken stop)
    {
        try
        {
            await using var command = new NpgsqlCommand("SELECT 1", session);
            await command.ExecuteScalarAsync(stop);
            return true;
        }
        catch (Exception ex) when (ex is NpgsqlException or InvalidOperationException or TimeoutException && !stop.IsCancellationRequested)
        {
            return false;
        }
    }

    [LoggerMessage(Level = LogLevel.Warning, Message = "Silos of another cluster (a silo without Redis, or a Redis cluster) serve '{ServiceId}' from this PostgreSQL database; waiting for them to stop.")]
    private static partial void LogWaiting(ILogger logger, string serviceId);

    [LoggerMessage(Level = LogLevel.Warning, Message = "Taking the lock of service '{ServiceId}' lost its PostgreSQL session ({Reason}); asking again in a new one.")]
    private static partial void LogSessionLost(ILogger logger, string serviceId, string reason);

    [LoggerMessage(Level = LogLevel.Information, Message = "The lock of service '{ServiceId}' was lost with its PostgreSQL session and is held again.")]
    private static partial void LogRetaken(ILogger logger, string serviceId);

    [LoggerMessage(Level = LogLevel.Error, Message = "The lock of service '{ServiceId}' was lost with its PostgreSQL session, and a silo of another cluster " +
        "has taken it (PostgreSQL session {Pid}, from {Client}): two clusters now serve this service from one database. Stop one, or give every silo ConnectionStrings__Redis.")]
    private static partial void LogTakenByAnother(ILogger logger, string serviceId, int pid, string client);

    [LoggerMessage(Level = LogLevel.Warning, Message = "Checking the lock of service '{ServiceId}' failed ({Reason}); the next check tries again.")]
    private static partial void LogCheckFailed(ILogger logger, string serviceId, string reason);
}
