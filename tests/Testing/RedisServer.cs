using System.Globalization;
using StackExchange.Redis;

namespace OrleansIdempotency.Testing;

/// <summary>A real Redis server on a free loopback port, without persistence. It can be stopped and started again.</summary>
public sealed class RedisServer : IAsyncDisposable
{
    private ServerProcess? process;

    private RedisServer(int port)
    {
        Port = port;
    }

    /// <summary>The loopback port the server listens on.</summary>
    public int Port { get; }

    /// <summary>StackExchange.Redis configuration string for this server.</summary>
    public string ConnectionString => $"127.0.0.1:{Port.ToString(CultureInfo.InvariantCulture)}";

    /// <summary>Starts a new server.</summary>
    public static Task<RedisServer> StartAsync() =>
        FreePort.StartOnOneAsync(port => new RedisServer(port), server => server.StartAgainAsync(), server => server.StopAsync());

    /// <summary>Starts the server (again) on its port and waits until it answers PING.</summary>
    public async Task StartAgainAsync()
    {
        var binary = File.Exists("/usr/bin/redis-server") ? "/usr/bin/redis-server" : "redis-server";
        process = ServerProcess.Start(binary,
            ["--port", Port.ToString(CultureInfo.InvariantCulture), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--protected-mode", "yes"]);
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(15);
        while (true)
        {
            if (process.HasExited)
            {
                throw new InvalidOperationException($"redis-server exited while starting:\n{process.Output}");
            }

            try
            {
                await using var connection = await ConnectionMultiplexer.ConnectAsync(ConnectionString + ",connectTimeout=500");
                await connection.GetDatabase().PingAsync();
                return;
            }
            catch (RedisConnectionException) when (DateTime.UtcNow < deadline)
            {
                await Task.Delay(100);
            }
        }
    }

    /// <summary>Stops the server (SIGKILL: Redis keeps nothing on disk here either way).</summary>
    public async Task StopAsync()
    {
        if (process is null)
        {
            return;
        }

        await process.SignalAndWaitAsync(9, TimeSpan.FromSeconds(15));
        process = null;
    }

    public async ValueTask DisposeAsync() => await StopAsync();
}
