using System.Globalization;
using System.Net;
using System.Net.Sockets;

namespace OrleansIdempotency.Testing;

/// <summary>Loopback ports nobody is listening on, that no outgoing connection can take before their server binds them.</summary>
/// <remarks>
/// A port the kernel hands out for a bind to port 0 comes from its ephemeral range, the range every outgoing
/// connection takes its local port from. Between the pick and the bind (a process starting, a node restarting on its
/// port) any client connection of any process could take it: seen in CI, an API process failed to bind its port while
/// silos were reconnecting to Redis. So ports are picked below that range, at random, once per process each.
/// </remarks>
public static class FreePort
{
    private const int Lowest = 10_000;

    private static readonly HashSet<int> HandedOut = [];
    private static readonly int Below = EphemeralRangeStart();

    /// <summary>
    /// Starts a server on a free port, and on another when its start fails with <see cref="InvalidOperationException"/>
    /// (most likely another process took the port between the pick and the bind), four tries in all. A server whose
    /// start failed is stopped, not left running to the end of the run.
    /// </summary>
    public static async Task<T> StartOnOneAsync<T>(Func<int, T> create, Func<T, Task> start, Func<T, Task> stop)
    {
        for (var attempt = 0; ; attempt++)
        {
            var server = create(Next());
            try
            {
                await start(server);
                return server;
            }
            catch (Exception ex)
            {
                try
                {
                    await stop(server);
                }
                catch (Exception)
                {
                    // The start's failure is the one to report.
                }

                if (ex is not InvalidOperationException || attempt == 3)
                {
                    throw;
                }
            }
        }
    }

    /// <summary>A port outside the ephemeral range that was free a moment ago and that this process has not handed out before.</summary>
    public static int Next()
    {
        if (Below - Lowest < 1_000)
        {
            // The ephemeral range leaves no room below it: fall back to the kernel's pick.
            using var listener = new TcpListener(IPAddress.Loopback, 0);
            listener.Start();
            return ((IPEndPoint)listener.LocalEndpoint).Port;
        }

        for (var attempt = 0; attempt < 1_000; attempt++)
        {
            var port = Random.Shared.Next(Lowest, Below);
            lock (HandedOut)
            {
                if (!HandedOut.Add(port))
                {
                    continue;
                }
            }

            if (IsFree(port))
            {
                return port;
            }
        }

        throw new InvalidOperationException($"No free loopback port between {Lowest} and {Below}.");
    }

    /// <summary>Configuration that puts a silo's silo and gateway endpoints on free ports.</summary>
    public static Dictionary<string, string?> SiloEndpoints() => new()
    {
        ["Orleans:Endpoints:SiloPort"] = Next().ToString(CultureInfo.InvariantCulture),
        ["Orleans:Endpoints:GatewayPort"] = Next().ToString(CultureInfo.InvariantCulture),
    };

    private static bool IsFree(int port)
    {
        try
        {
            using var listener = new TcpListener(IPAddress.Loopback, port);
            listener.Start();
            return true;
        }
        catch (SocketException)
        {
            return false;
        }
    }

    private static int EphemeralRangeStart()
    {
        const string Range = "/proc/sys/net/ipv4/ip_local_port_range";
        // Linux's default when the file cannot be read.
        return File.Exists(Range) && int.TryParse(File.ReadAllText(Range).Split((char[])['\t', ' ', '\n'], StringSplitOptions.RemoveEmptyEntries)[0],
            NumberStyles.None, CultureInfo.InvariantCulture, out var start) ? start : 32_768;
    }
}
