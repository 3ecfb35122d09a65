using System.Net;
using System.Net.Sockets;

namespace OrleansIdempotency.Testing;

/// <summary>Loopback ports nobody is listening on.</summary>
public static class FreePort
{
    /// <summary>A port the OS just handed out and released; another process could take it, so callers retry on a clash.</summary>
    public static int Next()
    {
        using var listener = new TcpListener(IPAddress.Loopback, 0);
        listener.Start();
        return ((IPEndPoint)listener.LocalEndpoint).Port;
    }
}
